"""Trainer ranks of the mixture-of-experts process tests (tests/vllm/test_vllm_moe.py): a tiny Qwen3-MoE under
FSDP2 (experts sharded on dim 0) or DeepSpeed ZeRO-3, pushing to a ``vllm serve`` after steps that change only some
experts."""
from __future__ import annotations


from .models import build_model, prompts, touch_experts
from .vllm_engines import http_greedy

N = 8


def moe_trainer(rank: int, world: int, url: str, model_dir: str, wrap: str, steps: list[list[int]]) -> dict:
    """Push after each step of ``steps`` (the experts it changes); rank 0 returns, per push, the report, the
    served greedy tokens and the full weights (for the transformers reference)."""
    from torch.distributed.tensor import DTensor

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0, kind="qwen3_moe")
    if wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained, module = model, model
        assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, DTensor)
    elif wrap == "zero3":
        from .roles import zero3_engine

        trained = zero3_engine(model)
        module = trained.module
    else:
        raise ValueError(wrap)
    out = {"reports": [], "tokens": [], "states": []}
    with WeightSync(trained, [url] if rank == 0 else None, SyncConfig(timeout_s=120, bucket_mb=0.02)) as sync:
        for step, experts in enumerate(steps):
            with _whole(module, wrap, modify=True):
                touch_experts(module, experts, seed=step)
            report = sync.push()
            with _whole(module, wrap, modify=False):
                state = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                         for n, p in module.named_parameters()}
            out["reports"].append(report.to_dict())
            if rank == 0:
                out["tokens"].append(http_greedy(url, model_dir, list(prompts().values()), N))
                out["states"].append(state)
        source = sync.sender.source
        out["source"] = f"{type(source).__name__}/{type(source.inner).__name__}"
    return out if rank == 0 else {"reports": out["reports"]}


def _whole(module, wrap: str, modify: bool):
    """ZeRO-3: every rank gathers the parameters (with ``modify``, rank 0's changes are kept; every rank makes the
    same ones); FSDP2: nothing to do (touch_experts changes each rank's own shard)."""
    import contextlib

    if wrap != "zero3":
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0 if modify else None)
