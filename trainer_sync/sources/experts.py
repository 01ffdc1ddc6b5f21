"""Fused experts -> the checkpoint's per-expert tensors, as flat ranges of the fused parameter (no copy).

Why: transformers 5 (5.17 on the GPU image, 5.19 here) keeps a Qwen3-MoE layer's experts as two 3-D parameters,
``mlp.experts.gate_up_proj [E, 2I, H]`` and ``mlp.experts.down_proj [E, H, I]``, while the checkpoint it writes
(``save_pretrained``, through its conversion mapping for the qwen2_moe family) and the one every vLLM release loads
has one tensor per expert and projection: ``mlp.experts.{e}.gate_proj.weight [I, H]`` (rows ``[0, I)`` of expert
e's gate_up block), ``...up_proj.weight`` (rows ``[I, 2I)``) and ``...down_proj.weight [H, I]``. Each of those is
one contiguous range of the fused tensor's flat elements, so a source can present it as its own tensor: the planner,
the codecs (block FP8 quantizes per expert, as FP8 MoE checkpoints store it) and the engine's handshake see the
checkpoint's names and shapes, and the packer copies straight from the fused parameter. An FSDP2 shard of a fused
parameter is a range of whole experts (dim 0), a ZeRO-3 partition any range: the view pieces are the overlaps.

A model that already has per-expert modules (older transformers, a custom model) has the checkpoint's names and
needs nothing. A fused layout other than ``[E, 2I, H]`` / ``[E, H, I]`` (a transposed one, as some other model
families keep) is refused with the shapes, rather than pushed under names whose bytes would be wrong.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..plan.buckets import LocalPiece
from .base import Source

_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertView:
    """Checkpoint tensor ``name`` = elements ``[offset, offset + prod(shape))`` of fused parameter ``param``."""

    name: str
    param: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def expert_views(shapes: dict[str, tuple[int, ...]], hidden_size: int | None) -> dict[str, list[ExpertView]]:
    """Pure: fused expert parameters among ``shapes`` (name -> shape) -> their per-expert checkpoint views, in
    checkpoint order. ``hidden_size`` (the model config's) tells the layout apart from a transposed one."""
    out: dict[str, list[ExpertView]] = {}
    for name, shape in shapes.items():
        m = _FUSED.match(name)
        if m is None or len(shape) != 3:
            continue
        experts, rows, cols = (int(s) for s in shape)
        prefix, kind = m["prefix"], m["kind"]
        hidden = cols if kind == "gate_up_proj" else rows
        if hidden_size is not None and hidden != hidden_size or kind == "gate_up_proj" and rows % 2:
            want = "[experts, 2 * expert width, hidden]" if kind == "gate_up_proj" else "[experts, hidden, width]"
            raise ValueError(f"trainer_sync: fused expert parameter {name} has shape {list(shape)}; only the "
                             f"layout {want} with hidden {hidden_size} (transformers' Qwen3-MoE) can be pushed "
                             f"under the checkpoint's per-expert names")
        views = []
        for e in range(experts):
            base = e * rows * cols
            if kind == "gate_up_proj":
                half = rows // 2
                views.append(ExpertView(f"{prefix}.{e}.gate_proj.weight", name, base, (half, cols)))
                views.append(ExpertView(f"{prefix}.{e}.up_proj.weight", name, base + half * cols, (half, cols)))
            else:
                views.append(ExpertView(f"{prefix}.{e}.down_proj.weight", name, base, (rows, cols)))
        out[name] = views
    return out


def view_pieces(piece: LocalPiece, views: list[ExpertView]) -> list[LocalPiece]:
    """Pure: the parts of ``views`` that one rank's piece of their fused parameter holds (none, some, or all)."""
    lo, hi = piece.start, piece.start + piece.numel
    out = []
    for v in views:
        a, b = max(lo, v.offset), min(hi, v.offset + v.numel)
        if a < b:
            out.append(LocalPiece(v.name, v.shape, piece.dtype, a - v.offset, b - a, piece.rank))
    return out


class ExpertSplitSource(Source):
    """Any source, with its fused expert parameters presented as the checkpoint's per-expert tensors."""

    def __init__(self, inner: Source, views: dict[str, list[ExpertView]]):
        # No Source.__init__: names, ranks and tensors are the inner source's.
        self.inner, self.views = inner, views
        self.model, self.rank, self.world = inner.model, inner.rank, inner.world
        self.aliases = inner.aliases
        self.of = {v.name: v for vs in views.values() for v in vs}
        self._starts: dict[str, int] = {}  # fused name -> this rank's piece start (refreshed by pieces())
        self._held: set[str] = set()  # view names this rank holds any of
        self.params = inner.params
        self._refresh()

    def _refresh(self) -> list[LocalPiece]:
        out, held = [], set()
        for p in self.inner.pieces():
            views = self.views.get(p.name)
            if views is None:
                out.append(p)
                continue
            self._starts[p.name] = p.start
            mine = view_pieces(p, views)
            held.update(v.name for v in mine)
            out.extend(mine)
        self._held = held
        return out

    def pieces(self) -> list[LocalPiece]:
        return self._refresh()

    def flat(self, name: str) -> torch.Tensor:
        v = self.of.get(name)
        if v is None:
            return self.inner.flat(name)
        fused = self.inner.flat(v.param)
        start = self._starts.get(v.param, 0)
        lo = max(v.offset, start) - start
        hi = min(v.offset + v.numel, start + fused.numel()) - start
        return fused[lo:hi]

    def gathering(self, names: list[str]):
        return self.inner.gathering(sorted({self.of[n].param if n in self.of else n for n in names}))

    def nonfinite(self) -> list[str]:
        return self.inner.nonfinite()

    def live(self, name: str) -> torch.Tensor | None:
        v = self.of.get(name)
        if v is None:
            return self.inner.live(name)
        fused = self.inner.live(v.param)
        return None if fused is None or name not in self._held else self.flat(name)


def split_experts(source: Source) -> Source:
    """``source`` itself, or wrapped in an ExpertSplitSource when the model keeps experts fused."""
    pieces = source.pieces()
    config = getattr(source.model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    views = expert_views({p.name: p.shape for p in pieces}, hidden if isinstance(hidden, int) else None)
    return ExpertSplitSource(source, views) if views else source
