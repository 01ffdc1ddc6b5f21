"""Process bodies for the GPU tests (NCCL bridging group; trainer on cuda:0, receiver on cuda:1)."""
from __future__ import annotations

import torch

from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.protocol.messages import JoinInfo


def gpu_model(device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)]).to(device=device,
                                                                                     dtype=torch.bfloat16)


def gpu_usage(device) -> dict:
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return {"free": free, "allocated": torch.cuda.memory_allocated(device)}


def nccl_trainer(rank, world, port, pushes, warmup):
    torch.cuda.set_device(0)
    model = gpu_model("cuda:0")
    sender = Sender(model, SyncConfig(port=port, token="gpu", bucket_mb=16, timeout_s=120))
    assert sender.backend == "nccl"
    sender.connect(1)
    usage, reports = {}, []
    for i in range(pushes):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.001 * (i + 1))
        reports.append(sender.push().to_dict())
        if i + 1 in (warmup, pushes):
            usage[i + 1] = gpu_usage("cuda:0")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sender.close()
    return usage, state, reports[-1]


def nccl_receiver(j, n, port, pushes, warmup):
    torch.cuda.set_device(1)
    mine = {k: v for k, v in gpu_model("cuda:1").state_dict().items()}
    r = Receiver(JoinInfo("127.0.0.1", port, "gpu", 0, 1, 1, 0, "nccl", 120))
    r.connect()
    usage = {}
    for i in range(pushes):
        r.receive(lambda batch: [mine[name].copy_(t) for name, t in batch])
        if i + 1 in (warmup, pushes):
            usage[i + 1] = gpu_usage("cuda:1")
    r.close()
    return usage, {k: v.cpu() for k, v in mine.items()}
