"""ModuleSource: a plain module or a DDP / ZeRO-1/2 one, where every rank holds every parameter whole.

Every rank offers everything; the planner spreads tensors over the ranks by bytes, so M ranks send ~1/M each.
"""
from __future__ import annotations

import torch

from ..plan.buckets import LocalPiece
from .base import Source


class ModuleSource(Source):
    def pieces(self) -> list[LocalPiece]:
        return [self._piece(n, p.shape, p.dtype, 0, p.numel()) for n, p in self.params.items()]

    def flat(self, name: str) -> torch.Tensor:
        return self.params[name].detach().reshape(-1)
