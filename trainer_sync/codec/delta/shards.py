"""Delta destinations that hold part of each tensor: the workers of a TP > 1 engine (issue 25).

Every worker of a TP engine receives every bucket whole, but its served parameters hold only its shard of each
tensor. ``Shards`` tells the delta codec where those parts are: ``held[name]`` lists ``(first element, flat view)``
pieces of the trainer's flat tensor. A delta bucket's changes are written into the pieces they fall in and the rest
are skipped (decode.apply_segments skips words outside every segment).

The base check: the delta's base checksum covers the whole bucket, which no worker holds. Its sums are sums over
the bucket's words, so the engine's workers check it together: each sums the pieces it *owns* (``owned``: every
element of the bucket is owned by exactly one worker of the engine; a replicated tensor by one of them), and
``combine`` adds the workers' sums of a round of buckets (a collective among the engine's workers, which all receive
the same rounds). A worker not at the base makes the combined sums differ, so every worker of the engine refuses
the same bucket and the trainer resends the push full. The result is not re-checked here (that would take a second
collective per round); the base check is what keeps a wrong delta out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...plan.buckets import Bucket, BucketPlan, dtype_of
from .checksums import DeltaError, Sums

Piece = tuple[int, torch.Tensor]  # (first element of the trainer's flat tensor, a flat view of the next numel())


@dataclass(frozen=True)
class Shards:
    """The parts of each tensor one worker holds (``held``) and counts in its engine's checksum (``owned``, views
    of the same places); ``combine(sums) -> sums`` adds the engine's workers' sums of one round of buckets."""

    held: dict[str, list[Piece]]
    owned: dict[str, list[Piece]]
    combine: Callable[[list[Sums]], list[Sums]]

    def bound(self, plan: BucketPlan, canon: dict[str, str]) -> "Shards":
        """The same shards under the plan's tensor names, checked against the plan (names, dtypes, ranges)."""
        errors = []
        held, owned = {}, {}
        for src, dst in ((self.held, held), (self.owned, owned)):
            for name, pieces in src.items():
                c = canon.get(name)
                if c is None:
                    errors.append(f"{name} is not a tensor the trainer sends")
                    continue
                t = plan.tensors[c]
                wire = dtype_of(t.dtype)
                for lo, v in pieces:
                    if v.dtype != wire or not v.is_contiguous() or lo < 0 or lo + v.numel() > t.numel:
                        errors.append(f"{name}: a piece of {v.numel()} {v.dtype} at {lo} does not fit the trainer's "
                                      f"{t.numel} {t.dtype}")
                        break
                dst[c] = sorted(pieces, key=lambda p: p[0])
        for b in plan.buckets:  # the checksum sums segments that start at 8-byte offsets of their bucket
            bad = next((off for off, _ in piece_segments(owned, plan, b) if off % 8), None)
            if bad is not None:
                errors.append(f"bucket {b.index}: a piece starts at byte {bad}, not at an 8-byte offset")
                break
        if errors:
            raise DeltaError("trainer_sync: Receiver shards do not match the trainer's tensors: " + "; ".join(errors))
        return Shards(held, owned, self.combine)


def piece_segments(pieces: dict[str, list[Piece]], plan: BucketPlan, b: Bucket) -> list[tuple[int, torch.Tensor]]:
    """The parts of ``pieces`` in bucket ``b``, each with its byte offset in the bucket."""
    out = []
    for s in b.slots:
        size = dtype_of(plan.tensors[s.name].dtype).itemsize
        for lo, v in pieces.get(s.name, ()):
            a, z = max(lo, s.start), min(lo + v.numel(), s.start + s.numel)
            if a < z:
                out.append((s.offset + (a - s.start) * size, v[a - lo:z - lo]))
    return out


def write_whole(pieces: list[Piece], t: torch.Tensor) -> None:
    """Copy a received whole tensor's elements into the pieces of it that are held."""
    flat = t.reshape(-1)
    for lo, v in pieces:
        v.copy_(flat[lo:lo + v.numel()])
