"""Process bodies for the delta-push tests (tests/processes/test_delta_push.py): trainers whose fp32 master weights
move by real AdamW steps and go to the receivers as bf16, receivers that keep a mirror or write into targets."""
from __future__ import annotations

import torch

from trainer_sync import Receiver, Sender, SyncConfig

from .roles import full_state, info, mlp, zero3_engine

BF16 = torch.bfloat16


def wire(state: dict) -> dict:
    return {k: v.to(BF16) for k, v in state.items()}


def _cfg(port, rank, **kw):
    return SyncConfig(**{"port": port if rank == 0 else 0, "token": "tok", "bucket_mb": 0.004, "timeout_s": 30,
                         "wire_dtype": "bfloat16", **kw})


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 16, generator=g)


def adamw_trainer(rank, world, n, port, pushes, kind="plain", lr=1e-4, cfg=None):
    """``pushes`` times: a real AdamW step on fp32 master weights, a push; returns the bf16 weights and reports."""
    model = mlp()
    states, reports = [], []
    if kind == "zero3":
        import deepspeed

        engine = zero3_engine(model, opt=lambda ps: torch.optim.AdamW(ps, lr=lr))
        sender = Sender(engine, _cfg(port, rank, **(cfg or {})))
        sender.connect(n)
        for i in range(pushes):
            engine.backward(engine(_batch(i)).pow(2).mean())
            engine.step()
            reports.append(sender.push().to_dict())
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                states.append(wire({k: p.detach().clone() for k, p in engine.module.named_parameters()}))
        sender.close()
        return states, reports
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return adamw_pushes(model, rank, n, port, pushes, lr, cfg)


def adamw_pushes(model, rank, n, port, pushes, lr=1e-4, cfg=None, before_push=None):
    """A Sender over ``model`` (plain or FSDP2): ``pushes`` times a real AdamW step, ``before_push(sender, i)`` if
    given, then a push. Returns the bf16 weights after each push and the reports."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sender = Sender(model, _cfg(port, rank, **(cfg or {})))
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        model(_batch(i)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if before_push is not None:
            before_push(sender, i)
        reports.append(sender.push().to_dict())
        states.append(wire(full_state(model)))
    sender.close()
    return states, reports


def bf16_targets() -> dict:
    return {k: torch.zeros(p.shape, dtype=BF16) for k, p in mlp().named_parameters()}


def delta_receiver(j, n, m, port, pushes, use_targets=False, tamper_after=None, timeout=60.0):
    """Receive ``pushes`` pushes (into a mirror, or into ``targets``); per push: the tensors ``on_batch`` saw
    (cloned), the targets after it (targets mode), whether on_batch was handed the targets themselves.
    ``tamper_after``: after that push, change one element of a target behind the trainer's back."""
    targets = bf16_targets() if use_targets else None
    r = Receiver(info(port, j, n, m, timeout=timeout), targets=targets)
    r.connect()
    out = []
    try:
        for k in range(pushes):
            got, same = {}, []

            def on_batch(batch):
                for name, t in batch:
                    got[name] = t.clone()
                    if targets is not None:
                        same.append(t.data_ptr() == targets[name].data_ptr())

            res = r.receive(on_batch)
            after = {k2: v.clone() for k2, v in targets.items()} if targets is not None else None
            out.append((res.version, got, after, all(same)))
            if tamper_after is not None and k == tamper_after:
                with torch.no_grad():
                    targets["2.weight"].view(-1)[7] += 1.0
    finally:
        r.close()
    return out


# ---- a receiver that misses a version: epochs --------------------------------------------------------------------

def epochs_trainer(rank, world, port, plan):
    """``plan``: per epoch (receivers, pushes). AdamW steps between pushes; returns bf16 states and reports."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sender = Sender(model, _cfg(port, rank))
    states, reports, i = [], [], 0
    for n, pushes in plan:
        sender.connect(n)
        for _ in range(pushes):
            model(_batch(i)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            i += 1
            reports.append(sender.push().to_dict())
            states.append(wire(full_state(model)))
        sender.close_group()
    sender.close()
    return states, reports


def epochs_receiver(j, world, port, epochs, m=1):
    """``epochs``: (epoch, receiver rank, receivers, pushes) this receiver takes part in; the same receiver state
    is carried from one epoch to the next (Receiver.adopt). Returns (version, tensors) per push taken."""
    out, prev = [], None
    for epoch, rank, num, pushes in epochs:
        r = Receiver(info(port, rank, num, m, epoch=epoch, timeout=60.0))
        if prev is not None:
            r.adopt(prev)
        r.connect()
        for _ in range(pushes):
            got = {}
            res = r.receive(lambda batch: got.update({k: v.clone() for k, v in batch}))
            out.append((res.version, got))
        r.close()
        prev = r
    return out


def bad_targets_receiver(j, n, m, port):
    """Targets of the wrong dtype for one tensor: the push fails with an error naming it; returns the error."""
    targets = bf16_targets()
    targets["2.weight"] = targets["2.weight"].float()
    r = Receiver(info(port, j, n, m, timeout=30.0), targets=targets)
    r.connect()
    try:
        r.receive(lambda batch: None)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    finally:
        r.close()
    return "no error"
