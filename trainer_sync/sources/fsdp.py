"""FsdpSource: an FSDP2 (``fully_shard``) model whose parameters are DTensors sharded on dim 0.

No rank ever materializes a full parameter: each rank sends its own shard (``to_local()``), which for a dim-0 shard
is one contiguous range of the flattened tensor, and the receiver places it. With HSDP (a replicate dimension too)
several ranks hold the same range and the planner picks one of them.
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..plan.buckets import LocalPiece
from .base import Source


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p``, detached: its FSDP2 shard for a DTensor, else ``p`` itself (same storage)."""
    p = p.detach()
    return p.to_local() if isinstance(p, DTensor) else p


class FsdpSource(Source):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._start: dict[str, int] = {}
        for name, p in self.params.items():
            if not isinstance(p, DTensor):
                self._start[name] = 0
                continue
            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            # Contiguous in the flat tensor only if sharded along dim 0 alone (what fully_shard does by default).
            if tuple(local_shape[1:]) != tuple(p.shape[1:]) or any(offset[1:]):
                raise ValueError(f"trainer_sync: parameter {name} is sharded as {p.placements}; only dim-0 "
                                 f"sharding (fully_shard's default) is supported")
            self._start[name] = int(offset[0]) * math.prod(p.shape[1:]) if p.dim() else 0

    def pieces(self) -> list[LocalPiece]:
        return [self._piece(n, p.shape, p.dtype, self._start[n], self.flat(n).numel())
                for n, p in self.params.items()]

    def flat(self, name: str) -> torch.Tensor:
        return local_tensor(self.params[name]).reshape(-1)
