"""Which elements of each checkpoint tensor a vLLM worker holds, for delta pushes into a TP > 1 engine (issue 25).

A worker of a TP engine receives every tensor of a push whole, but its parameters hold only its shard: rows of a
column-parallel weight (one contiguous run of the trainer's flat tensor), columns of a row-parallel one (one run per
row), a whole replicated tensor (norms), or nothing. A delta addresses elements of the trainer's flat tensor, so a
worker can write the changes that fall into its own runs straight into its parameters, if it knows where they are:
``held_pieces`` turns the fast path's learned slots (placement.py) into ``(first element, flat view)`` pieces.

Checking the base is the engine's business as a whole: the delta's base checksum covers whole buckets, and no
worker holds one whole, but the checksum is a sum over words, so the parts of the engine's workers add up to it when
every element is counted exactly once. ``owned_ranges`` picks, for each worker, the runs no lower-ranked worker of
the engine holds (a replicated tensor is counted by the first worker only), and ``uncovered`` names the tensors that
no worker holds all of (those make the engine take full pushes).
"""
from __future__ import annotations

import itertools
import json

import torch

from ...codec.delta.checksums import Sums
from ...codec.delta.shards import Shards
from ...errors import SyncError
from ...plan.buckets import BucketPlan
from ...protocol.messages import Keys
from ...transport.group import wait_keys
from .placement import Slot

Piece = tuple[int, torch.Tensor]  # (first element in the trainer's flat tensor, a flat view of the next numel())
Ranges = dict[str, list[tuple[int, int]]]  # tensor name -> sorted [lo, hi) element ranges


def pieces_of(slot: Slot) -> list[Piece] | None:
    """The runs of the trainer's flat tensor that one slot copies, each with the flat view of its place; None when
    the place is not contiguous where the source is (no run can be written as one slice)."""
    size, stride, dst = slot.size, slot.stride, slot.dst
    if tuple(dst.shape) != tuple(size):
        return None
    k, run = len(size), 1
    while k > 0:  # the innermost dims that are one contiguous run in the source and in the place
        d = k - 1
        if size[d] != 1 and (stride[d] != run or dst.stride(d) != run):
            break
        run *= size[d]
        k -= 1
    if run == 0:
        return []
    out = []
    for idx in itertools.product(*(range(n) for n in size[:k])):
        view = dst[idx] if idx else dst
        if not view.is_contiguous():
            return None
        out.append((slot.offset + sum(i * s for i, s in zip(idx, stride[:k])), view.reshape(-1)))
    return out


def held_pieces(slots: dict[str, list[Slot]], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
                ) -> tuple[dict[str, list[Piece]], dict[str, str]]:
    """Every checkpoint tensor's pieces on this worker (name -> pieces sorted by first element), and why not for
    the tensors that cannot be a delta destination (loaded into several places, a place that is not contiguous)."""
    held, why_not = {}, {}
    for name, places in slots.items():
        if name not in shapes:
            why_not[name] = "not in the served checkpoint's tensors"
            continue
        if len(places) != 1:
            why_not[name] = f"loaded into {len(places)} places"
            continue
        pieces = pieces_of(places[0])
        if pieces is None:
            why_not[name] = f"its place in {places[0].param} is not contiguous"
            continue
        held[name] = sorted(pieces, key=lambda p: p[0])
    return held, why_not


def ranges_of(held: dict[str, list[Piece]]) -> Ranges:
    """The element ranges of the pieces, merged where they touch (what a worker tells the engine's others)."""
    out: Ranges = {}
    for name, pieces in held.items():
        merged: list[tuple[int, int]] = []
        for lo, v in pieces:
            hi = lo + v.numel()
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        out[name] = merged
    return out


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        at = lo
        for a, b in sorted(minus):
            if b <= at or a >= hi:
                continue
            if a > at:
                out.append((at, a))
            at = max(at, b)
        if at < hi:
            out.append((at, hi))
    return out


def owned_ranges(everyone: list[Ranges], me: int) -> Ranges:
    """The ranges worker ``me`` counts in the engine's checksum: its own, less what a lower-ranked worker holds."""
    out: Ranges = {}
    for name, ranges in everyone[me].items():
        lower = [r for other in everyone[:me] for r in other.get(name, ())]
        left = _subtract(ranges, lower)
        if left:
            out[name] = left
    return out


def uncovered(everyone: list[Ranges], numels: dict[str, int]) -> list[str]:
    """The tensors (of ``numels``: name -> elements) that the workers together do not hold every element of."""
    missing = []
    for name, n in numels.items():
        ranges = sorted(r for w in everyone for r in w.get(name, ()))
        at = 0
        for lo, hi in ranges:
            if lo > at:
                break
            at = max(at, hi)
        if at < n:
            missing.append(name)
    return missing


def owned_pieces(held: dict[str, list[Piece]], owned: Ranges) -> dict[str, list[Piece]]:
    """The parts of this worker's pieces that fall in its ``owned`` ranges (views of the same places)."""
    out: dict[str, list[Piece]] = {}
    for name, ranges in owned.items():
        for lo, v in held.get(name, ()):
            hi = lo + v.numel()
            for a, b in ranges:
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    out.setdefault(name, []).append((a, v[a - lo:b - lo]))
    return out


class EngineSums:
    """``Shards.combine`` for the workers of one engine: each worker's sums of a round's buckets go through the
    bridging group's store (receivers ``first .. first + world - 1``), and every worker adds them all. Through the
    store rather than a group of their own, so that a push aborted by anyone stops the wait at once."""

    def __init__(self, store, first: int, world: int, me: int, timeout_s: float):
        self.store, self.first, self.world, self.me, self.timeout_s = store, first, world, me, timeout_s
        self.p, self.round = "", 0

    def begin(self, p: str) -> None:
        """Before push ``p`` (its key prefix): rounds count from 0."""
        self.p, self.round = p, 0

    def __call__(self, parts: list[Sums]) -> list[Sums]:
        keys = [Keys.shard_sums(self.p, self.round, self.first + i) for i in range(self.world)]
        self.round += 1
        # Plain JSON, not a protocol message: only the workers of this one engine (one release) read it.
        self.store.set(keys[self.me], json.dumps([list(x) for x in parts]))
        missing = wait_keys(self.store, keys, self.timeout_s, abort_key=Keys.abort(self.p), stage="apply",
                            max_pause_s=1e-3)
        if missing:
            raise SyncError(f"trainer_sync: the checksums of {len(missing)} other worker(s) of this engine did not "
                            f"come within {self.timeout_s:g}s", stage="apply")
        totals = [[0, 0, 0] for _ in parts]
        for k in keys:
            for total, got in zip(totals, json.loads(self.store.get(k))):
                for j in range(3):
                    total[j] += got[j]
        return [Sums(t) for t in totals]


def engine_shards(held: dict[str, list[Piece]], plan: BucketPlan, store, first: int, world: int, me: int,
                  timeout_s: float) -> tuple[Shards | None, str]:
    """This worker's ``Shards`` once every worker of its engine told its parts (through the store), or None and why.
    Every tensor of the trainer's plan must be held whole by the workers together, or the engine takes full pushes."""
    # Plain JSON, not a protocol message: only the workers of this one engine (one release) read it.
    store.set(Keys.shard_ranges(first + me), json.dumps(ranges_of(held)))
    keys = [Keys.shard_ranges(first + i) for i in range(world)]
    if not all(store.check([k]) for k in keys):
        return None, "the other workers of its engine have not offered their shards yet"
    everyone = [{n: [tuple(r) for r in rs] for n, rs in json.loads(store.get(k)).items()} for k in keys]
    merged: list[Ranges] = [{} for _ in everyone]
    for t in plan.tensors.values():  # under the plan's names (a checkpoint name may be an alias of one)
        for m, w in zip(merged, everyone):
            got = next((w[n] for n in (t.name, *t.aliases) if n in w), None)
            if got is not None:
                m[t.name] = got
    missing = uncovered(merged, {t.name: t.numel for t in plan.tensors.values()})
    if missing:
        return None, f"its workers together do not hold all of {len(missing)} tensors ({missing[0]})"
    mine = {next((n for n in (t.name, *t.aliases) if n in held), None): t.name for t in plan.tensors.values()}
    held_plan = {plan_name: held[name] for name, plan_name in mine.items() if name is not None}
    owned = owned_pieces(held_plan, owned_ranges(merged, me))
    return Shards(held_plan, owned, EngineSums(store, first, world, me, timeout_s)), ""
