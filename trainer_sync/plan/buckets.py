"""Which bytes go where: pure functions from tensor metadata to a bucket plan.

Nothing here touches a process group or a tensor's data, so all of it is unit-tested without processes, and every rank
(trainer or receiver) that runs these functions on the same input gets the same plan.

The model of the data: each trainer rank reports, for every parameter, the flat element range ``[start, start+numel)``
it can send (a ``LocalPiece``). A plain or DDP module reports the whole range on every rank; an FSDP2 rank reports
its dim-0 shard (a contiguous range of the flattened tensor); a ZeRO-3 rank reports what it can gather. The planner
picks exactly one sender for every element, packs each sender's pieces into buckets of at most ``bucket_bytes`` at
256-byte aligned offsets, and numbers the buckets in rounds (round i = the i-th bucket of every sender) so that all
senders move together and a receiver completes tensors early. What the plan must agree on with the receivers (wire
dtypes, their expected names and shapes, model facts) is checked apart, in handshake.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch


ALIGN = 256


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def itemsize(dtype: str) -> int:
    return dtype_of(dtype).itemsize


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class PlanError(ValueError):
    """The trainer ranks' metadata (or the receivers' expectations) cannot be turned into a plan."""


@dataclass(frozen=True)
class LocalPiece:
    """What one trainer rank can send of one tensor: flat elements ``[start, start + numel)``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int
    numel: int
    rank: int


@dataclass(frozen=True)
class WireTensor:
    """One tensor as the receivers see it: its full shape, the dtype on the wire, and tied aliases."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Slot:
    """A piece of one tensor inside a bucket."""

    name: str
    start: int  # first flat element of the tensor this slot holds
    numel: int
    offset: int  # byte offset inside the bucket (ALIGN-aligned)


@dataclass(frozen=True)
class Bucket:
    index: int
    src: int  # trainer rank that packs and sends it
    round: int
    nbytes: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class BucketPlan:
    tensors: dict[str, WireTensor]
    buckets: tuple[Bucket, ...]
    num_senders: int
    bucket_bytes: int

    @property
    def num_rounds(self) -> int:
        return 1 + max((b.round for b in self.buckets), default=-1)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    def rounds(self) -> list[list[Bucket]]:
        out: list[list[Bucket]] = [[] for _ in range(self.num_rounds)]
        for b in self.buckets:
            out[b.round].append(b)
        return out

    def buckets_of(self, src: int) -> list[Bucket | None]:
        """The bucket ``src`` sends in each round (None where it sends nothing)."""
        out: list[Bucket | None] = [None] * self.num_rounds
        for b in self.buckets:
            if b.src == src:
                out[b.round] = b
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "tensors": [[t.name, list(t.shape), t.dtype, list(t.aliases)] for t in self.tensors.values()],
                "buckets": [[b.index, b.src, b.round, b.nbytes, [list(asdict(s).values()) for s in b.slots]]
                            for b in self.buckets],
                "num_senders": self.num_senders,
                "bucket_bytes": self.bucket_bytes,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> "BucketPlan":
        d = json.loads(text)
        tensors = {n: WireTensor(n, tuple(s), dt, tuple(a)) for n, s, dt, a in d["tensors"]}
        buckets = tuple(Bucket(i, src, r, nb, tuple(Slot(*s) for s in slots)) for i, src, r, nb, slots in d["buckets"])
        return cls(tensors, buckets, d["num_senders"], d["bucket_bytes"])


class PlanCache:
    """Consecutive pushes almost always carry the same plan; parsing it again costs milliseconds for a big model."""

    def __init__(self) -> None:
        self.text: str | None = None
        self.plan: BucketPlan | None = None

    def parse(self, text: str) -> BucketPlan:
        if text != self.text:
            self.plan, self.text = BucketPlan.from_json(text), text
        return self.plan


def merge_pieces(pieces: list[LocalPiece]
                 ) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, list[LocalPiece]]]:
    """Group every rank's pieces by tensor, checking that ranks agree on each tensor's shape and dtype.

    Returns (tensor name -> (shape, dtype)) in first-seen order, and (tensor name -> pieces).
    """
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    by_name: dict[str, list[LocalPiece]] = {}
    errors = []
    for p in pieces:
        if p.name not in meta:
            meta[p.name] = (tuple(p.shape), p.dtype)
            by_name[p.name] = []
        elif meta[p.name] != (tuple(p.shape), p.dtype):
            errors.append(f"{p.name}: trainer rank {p.rank} reports shape {list(p.shape)} {p.dtype}, "
                          f"another rank {list(meta[p.name][0])} {meta[p.name][1]}")
        by_name[p.name].append(p)
    if errors:
        raise PlanError("trainer ranks disagree about tensors:\n  " + "\n  ".join(errors))
    return meta, by_name


def assign_senders(pieces: list[LocalPiece], num_senders: int) -> dict[str, list[LocalPiece]]:
    """Pick exactly one sender for every element of every tensor.

    Identical ranges held by several ranks (replicated parameters, HSDP replicas) go to the rank with the fewest bytes
    assigned so far, which spreads a plain module's tensors evenly over the trainer ranks. Disjoint ranges (FSDP
    shards) stay with their holders. Anything that leaves an element uncovered or covered twice is an error naming
    the tensor.
    """
    meta, by_name = merge_pieces(pieces)
    load = [0] * num_senders
    chosen: dict[str, list[LocalPiece]] = {}
    errors = []
    for name, (shape, dtype) in meta.items():
        ranges: dict[tuple[int, int], list[LocalPiece]] = {}
        for p in by_name[name]:
            if not 0 <= p.rank < num_senders:
                raise PlanError(f"{name}: piece from trainer rank {p.rank}, but there are {num_senders} senders")
            ranges.setdefault((p.start, p.numel), []).append(p)
        total = math.prod(shape)
        if total == 0:  # an empty tensor still travels (as an empty slot) so the receiver yields it
            chosen[name] = [min(by_name[name], key=lambda p: p.rank)]
            continue
        picked = []
        for (start, numel), holders in sorted(ranges.items()):
            if numel == 0:
                continue
            best = min(holders, key=lambda p: (load[p.rank], p.rank))
            load[best.rank] += numel * itemsize(dtype)
            picked.append(best)
        # Coverage: the picked ranges must tile [0, numel) exactly.
        cursor = 0
        for p in picked:
            if p.start != cursor:
                errors.append(f"{name}: elements [{cursor}, {p.start}) are held by no trainer rank"
                              if p.start > cursor else f"{name}: ranks overlap at element {p.start}")
                break
            cursor = p.start + p.numel
        else:
            if cursor != total:
                errors.append(f"{name}: elements [{cursor}, {total}) are held by no trainer rank")
        chosen[name] = picked
    if errors:
        raise PlanError("trainer shards do not cover the model:\n  " + "\n  ".join(errors))
    return chosen


def plan_buckets(
    pieces: list[LocalPiece],
    num_senders: int,
    bucket_bytes: int,
    wire_dtypes: dict[str, str] | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
    align: int = ALIGN,
) -> BucketPlan:
    """Turn every trainer rank's pieces into the plan all ranks follow.

    ``wire_dtypes`` maps a tensor to the dtype it travels in (default: its own). A piece larger than a bucket gets a
    bucket of its own; everything else fills buckets in model order at ``align``-byte offsets.
    """
    if bucket_bytes <= 0:
        raise PlanError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    wire_dtypes = wire_dtypes or {}
    aliases = aliases or {}
    chosen = assign_senders(pieces, num_senders)
    meta, _ = merge_pieces(pieces)
    tensors = {n: WireTensor(n, shape, wire_dtypes.get(n, dtype), tuple(aliases.get(n, ())))
               for n, (shape, dtype) in meta.items()}

    per_src: list[list[list[Slot]]] = [[] for _ in range(num_senders)]
    fill = [0] * num_senders
    for name, picked in chosen.items():
        size = itemsize(tensors[name].dtype)
        for p in picked:
            nbytes = p.numel * size
            slots = per_src[p.rank]
            if not slots or (fill[p.rank] > 0 and fill[p.rank] + nbytes > bucket_bytes):
                slots.append([])
                fill[p.rank] = 0
            offset = fill[p.rank]
            slots[-1].append(Slot(name, p.start, p.numel, offset))
            fill[p.rank] = align_up(offset + nbytes, align)
            if nbytes > bucket_bytes:  # an oversized piece closes its own bucket
                fill[p.rank] = bucket_bytes + 1

    buckets = []
    num_rounds = max((len(s) for s in per_src), default=0)
    for r in range(num_rounds):
        for src in range(num_senders):
            if r < len(per_src[src]):
                slots = tuple(per_src[src][r])
                last = slots[-1]
                nbytes = last.offset + last.numel * itemsize(tensors[last.name].dtype)
                buckets.append(Bucket(len(buckets), src, r, nbytes, slots))
    return BucketPlan(tensors, tuple(buckets), num_senders, bucket_bytes)


@dataclass(frozen=True)
class BufferFit:
    bucket_bytes: int
    num_buffers: int
    fallback: str | None  # why the plan is slower than asked, or None


def fit_budget(
    bucket_bytes: int, num_buffers: int, largest_piece: int, budget: int | None, buffers_per_stage: int = 1
) -> BufferFit:
    """Fit transfer buffers into a memory budget (bytes per process).

    A stage holds ``buffers_per_stage`` buffers (a receiver holds one per sender). A buffer must hold the larger of a
    bucket and the largest piece (which gets a bucket of its own). When
    ``num_buffers`` of them do not fit: first shrink buckets (keeps the overlap), then drop to one buffer (no
    overlap). A budget below the largest piece is an error: that tensor could not be sent at all.
    """
    k = buffers_per_stage
    if budget is None or num_buffers * k * max(bucket_bytes, largest_piece) <= budget:
        return BufferFit(bucket_bytes, num_buffers, None)
    if num_buffers == 2 and 2 * k * largest_piece <= budget:
        smaller = max(ALIGN, budget // (2 * k) // ALIGN * ALIGN)
        return BufferFit(smaller, 2, f"memory budget {budget} B: buckets shrunk from {bucket_bytes} B to {smaller} B")
    if k * largest_piece <= budget:
        return BufferFit(min(bucket_bytes, max(ALIGN, budget // k // ALIGN * ALIGN)), 1,
                         f"memory budget {budget} B: one buffer, pack/transfer/apply no longer overlap")
    raise PlanError(f"memory budget {budget} B is smaller than the largest tensor piece ({largest_piece} B)")
