"""Process bodies for the core data-path tests (importable by spawned children)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.sender import JoinInfo


def info(port, j, n, m, token="tok", epoch=0, timeout=20.0):
    return JoinInfo("127.0.0.1", port, token, epoch, m, n, j, "gloo", timeout)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 8))


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def collect_receiver(j, n, m, port, pushes, expected=None, token="tok", timeout=20.0):
    """Receive ``pushes`` pushes; return the tensors received in each (cloned) and each receive's version."""
    r = Receiver(info(port, j, n, m, token, timeout=timeout), expected=expected)
    r.connect()
    out = []
    try:
        for _ in range(pushes):
            got = {}
            res = r.receive(lambda batch: got.update({k: v.clone() for k, v in batch}))
            out.append((res.version, got))
    finally:
        r.close()
    return out


# ---- trainers -----------------------------------------------------------------------------------------------

def plain_trainer(rank, world, n, port, pushes, bucket_mb=0.004):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port, token="tok", bucket_mb=bucket_mb, timeout_s=20))
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        train_step(model, opt, i)
        reports.append(sender.push().to_dict())
        states.append(full_state(model))
    sender.close()
    return states, reports


def fsdp_trainer(rank, world, n, port, pushes):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=20))
    assert type(sender.source).__name__ == "FsdpSource"
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        train_step(model, opt, i)
        reports.append(sender.push().to_dict())
        states.append(full_state(model))
        # No rank may ever hold the full tensor during a push: each sends exactly its local shard's bytes.
        local = sum(p.to_local().numel() * 4 for p in model.parameters())
        reports[-1]["local_bytes"] = local
    sender.close()
    return states, reports


def zero3_trainer(rank, world, n, port, pushes):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    sender = Sender(engine, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=30))
    assert type(sender.source).__name__ == "DeepSpeedSource"
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        g = torch.Generator().manual_seed(i)
        loss = engine(torch.randn(8, 16, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        reports.append(sender.push().to_dict())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            states.append({k: p.detach().clone() for k, p in engine.module.named_parameters()})
    sender.close()
    return states, reports
