"""Fp8Source: any source, with its eligible weights presented block-quantized (``SyncConfig(wire_dtype="fp8")``).

For every eligible ``x.weight`` (see ``codec.fp8_eligible``) the planner and the packer see two tensors instead of
one, in checkpoint format: ``x.weight`` as ``float8_e4m3fn`` (same shape, same flat ranges as the inner source's
pieces) and ``x.weight_scale_inv`` as ``float32 [ceil(out/128), ceil(in/128)]``, offered whole by every rank that
holds any of the weight. Everything else passes through untouched. The planner's core knows nothing of FP8: it plans
these tensors like any others.

Quantization happens lazily while packing, on the weight's device, one tensor at a time (``flat`` returns a fresh
fp8 tensor that is dropped once copied into the bucket); only the scales (1/16384 of the elements, float32) are kept
for the rest of a push, because a weight and its scale may be packed in different rounds or by different ranks.

FSDP2 dim-0 shards do not line up with 128-row blocks: a rank holding rows [r0, r1) may hold only part of the block
rows at its edges. For a sharded (DTensor) weight every rank computes the amax of every block its rows touch (0
elsewhere) and the trainer ranks agree on the blocks' amax with one all-reduce(MAX) on the default process group per
round of buckets, batched over that round's sharded weights; each rank then quantizes its own rows with the agreed
scales, so the bits are those of quantizing the full weight, and no rank gathers a full parameter. The all-reduce is
a collective every trainer rank enters: it runs in ``gathering()``, which every rank enters for every round with the
same names (the pipeline guarantees it, as ZeRO-3 gathers need it too), the first time a round names the weight or
its scale. Whether a weight takes this path depends only on whether it is a DTensor, the same on every rank.
ZeRO-3 and plain/DDP sources hold whole tensors while packing and need no collective.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
import torch.distributed as dist

from .fp8 import (BLOCK, FP8_NAME, SCALE_SUFFIX, Fp8Rules, block_amax, quantize_fp8_blocks,
                     quantize_with_scales, scale_name, scale_shape, scales_from_amax)
from ..plan.buckets import LocalPiece
from ..sources.base import Source


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class Fp8Source(Source):
    def __init__(self, inner: Source, rules: Fp8Rules | None = None, block: int = BLOCK, backend: str | None = None):
        # No Source.__init__: names, ranks and tensors are the inner source's.
        self.inner = inner
        self.model, self.rank, self.world = inner.model, inner.rank, inner.world
        self.params = inner.params
        self.rules = rules or Fp8Rules()
        self.block = block
        self.backend = backend
        pieces = inner.pieces()
        self.meta = {p.name: (tuple(p.shape), p.dtype) for p in pieces}
        self._starts: dict[str, int] = {p.name: p.start for p in pieces}
        self.eligible = {n for n, (shape, dtype) in self.meta.items() if self.rules.eligible(n, shape, dtype)}
        self.scale_of = {scale_name(n): n for n in self.eligible}
        clash = sorted(set(self.scale_of) & set(self.meta))
        if clash:
            raise ValueError(f"trainer_sync fp8: the model already has tensors named like block scales: {clash}")
        # Sharded weights need the trainer ranks to agree on the amax of blocks that straddle shards.
        self.collective = {n for n in self.eligible if _is_dtensor(inner.params.get(n))}
        self.aliases = dict(inner.aliases)
        for n in self.eligible:
            tied = [a for a in inner.aliases.get(n, ()) if a == "weight" or a.endswith(".weight")]
            if tied:
                self.aliases[scale_name(n)] = tuple(scale_name(a) for a in tied)
        self._scales: dict[str, torch.Tensor] = {}  # weight name -> its full scale_inv, for the current push
        self._agreed: set[str] = set()

    # -- the Source interface ------------------------------------------------------------------------------------

    def pieces(self) -> list[LocalPiece]:
        # Called at the start of every push (before any gathering): weights may have changed since the last one.
        self._scales.clear()
        self._agreed.clear()
        out = []
        for p in self.inner.pieces():
            self._starts[p.name] = p.start
            if p.name not in self.eligible:
                out.append(p)
                continue
            out.append(replace(p, dtype=FP8_NAME))
            sshape = scale_shape(p.shape, self.block)
            out.append(LocalPiece(scale_name(p.name), sshape, "float32", 0, math.prod(sshape), p.rank))
        return out

    def flat(self, name: str) -> torch.Tensor:
        if name in self.scale_of:
            return self._scale(self.scale_of[name]).reshape(-1)
        if name in self.eligible:
            return self._quantized(name).reshape(-1)
        return self.inner.flat(name)

    def live(self, name: str) -> torch.Tensor | None:
        # A quantized weight and its scales are fresh tensors each push: only pass-through tensors live.
        return None if name in self.eligible or name in self.scale_of else self.inner.live(name)

    @contextlib.contextmanager
    def gathering(self, names: list[str]):
        inner_names = sorted({self.scale_of.get(n, n) for n in names})
        with self.inner.gathering(inner_names):
            self._agree([n for n in inner_names if n in self.collective and n not in self._agreed])
            yield

    def nonfinite(self) -> list[str]:
        return self.inner.nonfinite()

    # -- quantization --------------------------------------------------------------------------------------------

    def _local_rows(self, name: str) -> tuple[torch.Tensor, int]:
        """This rank's rows of weight ``name`` as a 2-D tensor, and the index of its first row."""
        rows, cols = self.meta[name][0]
        local = self.inner.flat(name)
        start = self._starts.get(name, 0)
        if start % cols or local.numel() % cols:
            raise ValueError(f"trainer_sync fp8: {name}: the local piece [{start}, {start + local.numel()}) is not "
                             f"whole rows of {cols} elements (only dim-0 shards can be block-quantized)")
        return local.view(local.numel() // cols, cols), start // cols

    def _agree(self, names: list[str]) -> None:
        """All trainer ranks together: the full scale_inv of each sharded weight in ``names`` (same list everywhere)."""
        if not names:
            return
        amaxes = []
        for n in names:
            w, r0 = self._local_rows(n)
            amaxes.append(block_amax(w, self.block, r0, self.meta[n][0][0]))
        flat = torch.cat([a.reshape(-1) for a in amaxes])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        for n, a in zip(names, flat.split([a.numel() for a in amaxes])):
            self._scales[n] = scales_from_amax(a.view(scale_shape(self.meta[n][0], self.block)))
        self._agreed.update(names)

    def _scale(self, name: str) -> torch.Tensor:
        s = self._scales.get(name)
        if s is None:
            if name in self.collective:
                raise RuntimeError(f"trainer_sync fp8: scales of sharded {name} requested outside the round that "
                                   f"names it (gathering() not entered?)")
            w, _ = self._local_rows(name)
            s = self._scales[name] = scales_from_amax(block_amax(w, self.block))
        return s

    def _quantized(self, name: str) -> torch.Tensor:
        w, r0 = self._local_rows(name)
        s = self._scales.get(name)
        if s is not None or name in self.collective:
            return quantize_with_scales(w, self._scale(name), self.block, r0, backend=self.backend)
        q, self._scales[name] = quantize_fp8_blocks(w, self.block, self.backend)
        return q


__all__ = ["Fp8Source", "SCALE_SUFFIX"]
