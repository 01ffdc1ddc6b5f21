"""Sharded LoRA trainers (FSDP2, DeepSpeed ZeRO-3; gloo processes) pushing their adapter into an in-process vLLM
engine that lives in the test's own process (issue 27).

vLLM's in-process engine cannot share a process with a trainer rank's default process group, so the test process
holds the engine and serves its control calls (pause, start, update, finish, ...) to trainer rank 0 over a pipe
(``PipeClient`` there, ``serve_calls`` here); the tensors go the usual way, over the bridging group between the
trainer ranks and the engine's worker. The engine's ``LlmClient`` makes every call, so what runs is exactly what
WeightSync would do with the engine in rank 0's process.
"""
from __future__ import annotations

import os
import threading

import torch

from trainer_sync.engines.clients import EngineCallError, EngineClient, LlmClient

from .lora import peft_model
from .models import train_step


class PipeClient(EngineClient):
    """Trainer rank 0's handle on the engine in the test process: each call goes over ``conn`` and waits."""

    name = "engine 0 (in-process LLM)"

    def __init__(self, conn):
        self.conn = conn

    def _call(self, what: str, *args):
        self.conn.send((what, args))
        ok, value = self.conn.recv()
        if not ok:
            raise EngineCallError(self.name, what, value)
        return value

    def world_size(self) -> int:
        return self._call("world_size")

    def init(self, join_info: dict) -> None:
        self._call("init", join_info)

    def pause(self, mode: str) -> None:
        self._call("pause", mode)

    def resume(self) -> None:
        self._call("resume")

    def start(self) -> None:
        self._call("start")

    def update(self, info: dict | None = None) -> None:
        self._call("update", info)

    def finish(self, version: str | None) -> None:
        self._call("finish", version)

    def reset_prefix_cache(self) -> None:
        self._call("reset_prefix_cache")

    def weight_version(self) -> str | None:
        return self._call("weight_version")

    def shutdown(self) -> None:
        self._call("shutdown")


def serve_calls(llm, conn, stop: threading.Event) -> None:
    """The test process: run rank 0's engine calls on ``llm``, one at a time, until ``stop``."""
    client = LlmClient(llm)
    while not stop.is_set():
        if not conn.poll(0.05):
            continue
        what, args = conn.recv()
        try:
            conn.send((True, getattr(client, what)(*args)))
        except EngineCallError as e:
            conn.send((False, e.detail))


def _adapter_state(named) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named if "lora_" in n}


def fsdp_lora_trainer(rank: int, world: int, conn, steps: int) -> dict:
    """One rank of a 2-rank FSDP2 LoRA trainer: shard the PeftModel, train its adapter ``steps`` times, pushing
    after each; rank 0 returns the reports and the whole adapter (for the reference tokens)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from trainer_sync import SyncConfig, WeightSync

    model = peft_model(seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_A" in n)
    reports = []
    with WeightSync(model, [PipeClient(conn)] if rank == 0 else None, SyncConfig(timeout_s=60)) as sync:
        assert type(sync.sender.source).__name__ == "LoraSource"
        assert type(sync.sender.source.inner).__name__ == "FsdpSource"
        for step in range(steps):
            train_step(model, seed=step, lr=0.05)
            reports.append(sync.push().to_dict())
    full = [(n, p.full_tensor() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()]
    return {"reports": reports, "adapter": _adapter_state(full) if rank == 0 else None}


def zero3_lora_trainer(rank: int, world: int, conn, steps: int) -> dict:
    """One rank of a 2-rank DeepSpeed ZeRO-3 LoRA trainer (SGD on the adapter), pushing after each step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from trainer_sync import SyncConfig, WeightSync

    deepspeed.init_distributed(dist_backend="gloo")
    model = peft_model(seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    reports = []
    with WeightSync(engine, [PipeClient(conn)] if rank == 0 else None, SyncConfig(timeout_s=60)) as sync:
        assert type(sync.sender.source.inner).__name__ == "DeepSpeedSource"
        for step in range(steps):
            gen = torch.Generator().manual_seed(step)
            ids = torch.randint(2, 256, (2, 16), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            reports.append(sync.push().to_dict())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = _adapter_state(engine.module.named_parameters())
    return {"reports": reports, "adapter": state if rank == 0 else None}


def _merged_reference(adapter_state: dict) -> dict[str, torch.Tensor]:
    """HF's merge_and_unload of the tiny PeftModel with ``adapter_state``: what a merged push must deliver."""
    from .lora import merged_copy

    model = peft_model(seed=0)
    model.load_state_dict(adapter_state, strict=False)
    return {n: t.detach().clone() for n, t in merged_copy(model).state_dict().items()}


def sharded_merged_sender(rank: int, world: int, port: int, kind: str, pushes: int) -> dict:
    """One rank of a 2-rank FSDP2 or ZeRO-3 LoRA trainer sending merged pushes (``SyncConfig(lora="merged")``) to
    plain receivers; rank 0 returns the reports and, per push, HF's merge of the whole model it had then."""
    from torch.distributed.tensor import DTensor

    from trainer_sync import Sender, SyncConfig

    model = peft_model(seed=0)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        target = model
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        target, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True})
    sender = Sender(target, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.01, timeout_s=60,
                                       lora="merged"))
    sender.connect(1)
    reports, refs = [], []
    for step in range(pushes):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(2, 256, (2, 16), generator=gen)
        if kind == "fsdp2":
            train_step(model, seed=step, lr=0.05)
        else:
            target.backward(target(input_ids=ids, labels=ids).loss)
            target.step()
        reports.append(sender.push().to_dict())
        if kind == "fsdp2":
            state = _adapter_state((n, p.full_tensor() if isinstance(p, DTensor) else p)
                                   for n, p in model.named_parameters())
        else:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(target.module.parameters())):
                state = _adapter_state(target.module.named_parameters())
        refs.append(_merged_reference(state) if rank == 0 else None)
    sender.close()
    return {"reports": reports, "refs": refs}
