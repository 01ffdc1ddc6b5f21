"""DeepSpeedSource: a DeepSpeed ZeRO-3 model (ZeRO-1/2 keep whole parameters: use ModuleSource).

ZeRO-3 parameters live partitioned; every rank offers every tensor and the planner assigns each to one sender.
Around each round of buckets, every trainer rank enters ``GatheredParameters`` on that round's tensors together, so
at most one round (M buckets) is gathered at a time, never the whole model, and no rank runs ahead into a collective
the others are not in. The gather of round k+1 overlaps the wire time of round k.
"""
from __future__ import annotations

import torch

from ..plan.buckets import LocalPiece
from .base import Source


def is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


class DeepSpeedSource(Source):
    def pieces(self) -> list[LocalPiece]:
        return [self._piece(n, p.ds_shape, p.dtype, 0, p.ds_numel) for n, p in self.params.items()]

    def flat(self, name: str) -> torch.Tensor:
        # Only valid inside gathering(): the full parameter is present then.
        return self.params[name].detach().reshape(-1)

    def live(self, name: str) -> None:
        return None  # flat() is a transient gather: nothing lives to be mapped

    def gathering(self, names: list[str]):
        import deepspeed

        return deepspeed.zero.GatheredParameters([self.params[n] for n in names], modifier_rank=None)

    def nonfinite(self) -> list[str]:
        # The local partition covers this rank's share of every parameter; together the ranks check everything
        # without a gather.
        return [n for n, p in self.params.items()
                if p.ds_tensor.is_floating_point() and not bool(torch.isfinite(p.ds_tensor).all())]
