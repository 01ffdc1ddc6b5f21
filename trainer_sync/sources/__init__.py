"""Where tensors come from: pick the source that matches how the model is wrapped."""
from __future__ import annotations

import torch

from .base import Source, clean_name, unwrap
from .deepspeed import DeepSpeedSource, is_zero3
from .experts import ExpertSplitSource, split_experts
from .fsdp import FsdpSource
from .lora import LoraSource
from .module import ModuleSource
from .peft import find_adapter


def make_source(model: torch.nn.Module, rename: dict[str, str] | None = None, **kwargs) -> Source:
    """ZeRO-3 -> DeepSpeedSource, any DTensor parameter (FSDP2) -> FsdpSource, else ModuleSource; a PEFT LoRA
    model's source is wrapped in a LoraSource (lora.py: adapter, merged and dense tensors, rank 0's plan picks); fused
    experts (transformers' MoE layers) are presented under the checkpoint's per-expert names (experts.py)."""
    inner = unwrap(model)
    adapter = find_adapter(inner)
    if adapter is not None:
        return LoraSource(_wrapped(inner, None, **kwargs), adapter, rename)
    return _wrapped(inner, rename, **kwargs)


def _wrapped(inner: torch.nn.Module, rename: dict[str, str] | None, **kwargs) -> Source:
    from torch.distributed.tensor import DTensor

    if is_zero3(inner):
        source = DeepSpeedSource(inner, rename, **kwargs)
    elif any(isinstance(p, DTensor) for p in inner.parameters()):
        source = FsdpSource(inner, rename, **kwargs)
    else:
        source = ModuleSource(inner, rename, **kwargs)
    return split_experts(source)


__all__ = ["Source", "ModuleSource", "FsdpSource", "DeepSpeedSource", "ExpertSplitSource", "LoraSource",
           "make_source", "clean_name"]
