"""Where tensors come from: pick the source that matches how the model is wrapped."""
from __future__ import annotations

import torch

from .base import Source, clean_name, unwrap
from .deepspeed import DeepSpeedSource, is_zero3
from .fsdp import FsdpSource
from .module import ModuleSource


def make_source(model: torch.nn.Module, rename: dict[str, str] | None = None, **kwargs) -> Source:
    """ZeRO-3 -> DeepSpeedSource, any DTensor parameter (FSDP2) -> FsdpSource, else ModuleSource."""
    from torch.distributed.tensor import DTensor

    inner = unwrap(model)
    if is_zero3(inner):
        return DeepSpeedSource(inner, rename, **kwargs)
    if any(isinstance(p, DTensor) for p in inner.parameters()):
        return FsdpSource(inner, rename, **kwargs)
    return ModuleSource(inner, rename, **kwargs)


__all__ = ["Source", "ModuleSource", "FsdpSource", "DeepSpeedSource", "make_source", "clean_name"]
