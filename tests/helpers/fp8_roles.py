"""Process bodies for the FP8-on-the-wire tests (importable by spawned children)."""
from __future__ import annotations

import torch

from trainer_sync import Receiver, Sender, SyncConfig

from .roles import info, receive_pushes


class TinyLM(torch.nn.Module):
    """Qwen3-like names: embeddings, norms (incl. q/k norms), attention and MLP linears, untied lm_head."""

    def __init__(self, hidden=256, inter=700, vocab=300, layers=2, dtype=torch.bfloat16, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for n, (o, i) in dict(q_proj=(hidden, hidden), k_proj=(128, hidden), v_proj=(128, hidden),
                                  o_proj=(hidden, hidden)).items():
                setattr(layer.self_attn, n, torch.nn.Linear(i, o, bias=n != "o_proj"))
            layer.self_attn.q_norm = torch.nn.LayerNorm(64)
            layer.mlp = torch.nn.Module()
            layer.mlp.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            layer.mlp.up_proj = torch.nn.Linear(hidden, inter, bias=False)
            layer.mlp.down_proj = torch.nn.Linear(inter, hidden, bias=False)
            layer.input_layernorm = torch.nn.LayerNorm(hidden)
            self.layers.append(layer)
        self.norm = torch.nn.LayerNorm(hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        self.to(dtype)



def expected_of(model, dtype=None) -> dict:
    return {n: (tuple(p.shape), dtype or str(p.dtype).removeprefix("torch."))
            for n, p in model.named_parameters()}


def receive_once(port, j, n, m, **kwargs) -> tuple[int, dict]:
    return receive_pushes(Receiver(info(port, j, n, m, timeout=30.0), **kwargs), 1, field="bytes")[0]


# ---- plain module: an fp8 push, then a bf16 push of the same weights -------------------------------------------

def plain_trainer(rank, world, n, ports):
    model = TinyLM(vocab=64)
    reports = {}
    for wire, port in zip(("fp8", "model"), ports):
        sender = Sender(model, SyncConfig(port=port, token="tok", bucket_mb=0.25, timeout_s=30, wire_dtype=wire))
        sender.connect(n)
        reports[wire] = sender.push().to_dict()
        sender.close()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, reports


def plain_receiver(j, n, m, ports, mode):
    """mode "dequantize": a bf16 engine opted in (states its bf16 expectations); "passthrough": takes fp8 + scales
    as sent (what a block-FP8 engine loads); then the bf16 push of the same model."""
    model = TinyLM(vocab=64)
    if mode == "dequantize":
        first = receive_once(ports[0], j, n, m, expected=expected_of(model), dequantize_fp8=torch.bfloat16)
    else:
        first = receive_once(ports[0], j, n, m)
    return first, receive_once(ports[1], j, n, m, expected=expected_of(model))


# ---- FSDP2: dim-0 shards that cut through 128-row blocks, two pushes with the weights changed between ----------

class Sharded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.up = torch.nn.Linear(256, 300)  # weight [300, 256]: 2 ranks hold rows 0-149 / 150-299
        self.down = torch.nn.Linear(300, 130)  # weight [130, 300]: rows 0-64 / 65-129, one block row
        self.norm = torch.nn.LayerNorm(130)
        with torch.no_grad():
            # Block row 1 of up.weight (rows 128-255) is split 128-149 | 150-255; make the larger values sit on
            # rank 0's side so that a rank-local amax would give rank 1 a different (wrong) scale.
            self.up.weight[128:150] *= 50.0
            self.down.weight[:65] *= 20.0


def fsdp_trainer(rank, world, n, port, pushes=2):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = Sharded()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.05, timeout_s=30,
                                      wire_dtype="fp8"))
    assert type(sender.source).__name__ == "Fp8Source"
    assert type(sender.source.inner).__name__ == "FsdpSource"
    assert sender.source.collective == {"up.weight", "down.weight"}
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5).add_(0.01)
        reports.append(sender.push().to_dict())
        states.append({k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                       for k, p in model.named_parameters()})
    sender.close()
    return states, reports


def fsdp_receiver(j, n, m, port, mode, pushes=2):
    model = Sharded()
    r = Receiver(info(port, j, n, m, timeout=30.0), expected=expected_of(model) if mode == "dequantize" else None,
                 dequantize_fp8=torch.float32 if mode == "dequantize" else None)
    return receive_pushes(r, pushes, field="bytes")


# ---- ZeRO-3: weights and their scales gathered round by round --------------------------------------------------

def zero3_trainer(rank, world, n, port):
    import deepspeed
    from .roles import zero3_engine

    engine = zero3_engine(Sharded())
    # small buckets: weights and their scales land in different rounds and on different ranks
    sender = Sender(engine, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.04, timeout_s=60,
                                       wire_dtype="fp8"))
    assert type(sender.source.inner).__name__ == "DeepSpeedSource" and not sender.source.collective
    sender.connect(n)
    report = sender.push().to_dict()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    sender.close()
    return state, report


def zero3_receiver(j, n, m, port):
    # 90 s to reach the store: the trainer ranks import DeepSpeed first (over 20 s on a loaded 2-core box)
    return receive_pushes(Receiver(info(port, j, n, m, timeout=90.0)), 1, field="bytes")[0]
