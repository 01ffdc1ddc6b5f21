"""TP-aware bytes: a receiver rank that serves one tensor-parallel shard receives only that shard's bytes.

checkpoint-engine (and a plain trainer_sync push) broadcasts every byte of the model to every engine worker, and each
worker keeps the 1/tp it serves. Here the split is planned from the engine's parameter layout instead: receivers are
grouped by their tp rank, and the trainer ranks send each group only the elements its rank holds. Per receiver that is
about ``1/tp`` of the model plus the replicated tensors (norms, and k/v heads that GQA replicates when
``tp > num_kv_heads``).

Everything here up to ``send_tp`` is pure (metadata in, plan out) and is unit-tested without processes.

The model of the data, in checkpoint coordinates (the flat, row-major elements of each checkpoint-format tensor):

* ``Split`` says how the engine shards one tensor along one dim (or replicates it);
* ``TpLayout`` maps checkpoint names to splits (regex rules, first match wins); ``llama_layout`` models vLLM's
  Llama/Qwen2/Qwen3 layers;
* ``tp_ranges(shape, split, tp, t)`` is the set of flat elements tp rank ``t`` needs, as one ``Strided``
  ``(start, length, stride, count)``: a dim-0 split is one contiguous range (count 1), a dim-1 split of a
  ``[out, in]`` matrix is ``out`` runs of ``in/tp`` elements, ``in`` apart;
* in **shard-local coordinates** (the flat elements of the shard tensor as the engine holds it, row-major), any
  contiguous range of the checkpoint tensor intersected with a ``Strided`` is again one contiguous range. So an FSDP2
  dim-0 piece (or a whole tensor) of a trainer rank maps to one ``LocalPiece`` of the *shard* tensor, and the
  existing planner (``plan.plan_buckets``) plans each tp group unchanged: its ``WireTensor`` has the shard's shape and
  the checkpoint's name, and a receiver's ``Assembler`` hands out shard tensors by name.

``plan_tp`` returns one ``BucketPlan`` per tp rank that has receivers; ``TpPlan.steps()`` is the one global order of
(round, tp rank) that every trainer rank sends in (the same order everywhere, so concurrent groups cannot deadlock);
``ShardSource`` presents a trainer source's pieces in shard-local coordinates (gathering the strided elements of a
dim-1 split while packing); ``send_tp`` is the sender loop over several groups; receivers use ``pipeline.receive``
with their group's plan as is. ``loader_tensor`` turns a received shard back into a checkpoint-shaped tensor that
vLLM's own ``weight_loader`` narrows to the same shard.

Not wired into ``Sender``/``Receiver`` yet: their handshake would need each receiver to report its tp rank (and the
engine's layout) with its expectations, and the vLLM backend to feed shards to ``load_weights`` (``loader_tensor``).
``benchmarks/bench_multi_gpu.py`` runs this data path end to end on its own rendezvous store.

Limits (named so nobody assumes otherwise): one tensor's split is one slab along one dim (true for every vLLM
Llama/Qwen layer); pipeline parallelism (a rank holding a subset of layers) and expert parallelism are not modelled;
fp8 ``weight_scale_inv`` tensors need their own block-wise rules (none are given by ``llama_layout``).
"""
from __future__ import annotations

import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ..plan.buckets import ALIGN, Bucket, BucketPlan, Expected, LocalPiece, PlanError, itemsize, merge_pieces, plan_buckets

# vLLM's DEFAULT_VOCAB_PADDING_SIZE (vllm/model_executor/layers/vocab_parallel_embedding.py).
VOCAB_PAD = 64


# ---- layout ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """How the engine shards one checkpoint tensor over tp ranks.

    kind:
      * ``"replicated"``: every tp rank holds the whole tensor;
      * ``"even"``: ``dim`` is cut into ``tp`` equal slabs (vLLM's ``divide``: must divide evenly);
      * ``"heads"``: ``dim`` holds ``num_heads`` heads; ``tp`` must divide ``num_heads``, or with ``replicate`` (GQA
        k/v) ``num_heads`` may divide ``tp`` and then rank ``t`` holds head ``t // (tp // num_heads)`` (vLLM's
        ``QKVParallelLinear``: ``num_kv_head_replicas``);
      * ``"vocab"``: vLLM's ``VocabParallelEmbedding`` / ``ParallelLMHead``: the vocab is padded to a multiple of
        ``pad_to``, each rank gets ``padded / tp`` rows of it, and the rows past the real vocab are padding (zeros the
        engine fills itself, never sent).
    """

    kind: str
    dim: int = 0
    num_heads: int = 0
    replicate: bool = False
    pad_to: int = VOCAB_PAD

    def __post_init__(self) -> None:
        if self.kind not in ("replicated", "even", "heads", "vocab"):
            raise ValueError(f"unknown split kind {self.kind!r}")
        if self.kind == "heads" and self.num_heads <= 0:
            raise ValueError("a 'heads' split needs num_heads > 0")


REPLICATED = Split("replicated")


@dataclass(frozen=True)
class TpLayout:
    """Checkpoint name -> Split: ``rules`` are (regex, Split), searched in order, first match wins.

    ``default`` applies to names no rule matches; None (the default) makes an unmatched name an error, because a wrong
    guess would hand an engine rank the wrong elements. ``REPLICATED`` is always a safe default (it sends the whole
    tensor to every group, as a plain push does).
    """

    rules: tuple[tuple[str, Split], ...]
    default: Split | None = None

    def split_of(self, name: str) -> Split:
        for pattern, split in self.rules:
            if re.search(pattern, name):
                return split
        if self.default is None:
            raise PlanError(f"{name}: no TP layout rule matches this tensor (add a rule or a default)")
        return self.default


def llama_layout(num_attention_heads: int, num_key_value_heads: int | None = None, vocab_pad_to: int = VOCAB_PAD,
                 extra_rules: Iterable[tuple[str, Split]] = (), default: Split | None = None) -> TpLayout:
    """vLLM's layout of a Llama / Qwen2 / Qwen3 / Mistral-style dense model, in checkpoint (HF) names.

    From vLLM's layers (vllm/model_executor/layers/linear.py, vocab_parallel_embedding.py) and models (llama.py,
    qwen3.py): q/k/v_proj go into ``QKVParallelLinear`` (dim 0 by heads; k/v replicated when tp > num_kv_heads),
    gate/up_proj into ``MergedColumnParallelLinear`` (dim 0), o_proj/down_proj are ``RowParallelLinear`` (dim 1; a
    row-parallel bias is not split), embed_tokens / lm_head are vocab-parallel (dim 0, padded), every RMSNorm
    (input/post_attention_layernorm, model.norm, Qwen3's q_norm/k_norm) is replicated.
    """
    kv = num_key_value_heads or num_attention_heads
    rules = list(extra_rules) + [
        (r"(^|\.)q_proj\.(weight|bias)$", Split("heads", 0, num_attention_heads)),
        (r"(^|\.)(k_proj|v_proj)\.(weight|bias)$", Split("heads", 0, kv, replicate=True)),
        (r"(^|\.)(gate_proj|up_proj)\.(weight|bias)$", Split("even", 0)),
        (r"(^|\.)(o_proj|down_proj)\.weight$", Split("even", 1)),
        (r"(^|\.)(o_proj|down_proj)\.bias$", REPLICATED),
        (r"(^|\.)(embed_tokens|lm_head)\.weight$", Split("vocab", 0, pad_to=vocab_pad_to)),
        (r"norm\.weight$", REPLICATED),
        (r"rotary_emb\.inv_freq$", REPLICATED),
    ]
    return TpLayout(tuple(rules), default)


def layout_from_config(config) -> TpLayout:
    """``llama_layout`` from a HF config (object or dict) with num_attention_heads / num_key_value_heads."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return llama_layout(int(get("num_attention_heads")), int(get("num_key_value_heads") or get("num_attention_heads")))


# ---- element ranges ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Strided:
    """Flat elements ``start + i*stride + [0, length)`` for ``i in range(count)`` (``length <= stride``)."""

    start: int
    length: int
    stride: int
    count: int

    @property
    def numel(self) -> int:
        return self.length * self.count

    @property
    def end(self) -> int:
        """One past the last element (``start`` when empty)."""
        return self.start + (self.count - 1) * self.stride + self.length if self.numel else self.start

    def runs(self) -> Iterable[tuple[int, int]]:
        """(start, length) of each contiguous run (merged when the runs touch)."""
        if not self.numel:
            return []
        if self.length == self.stride or self.count == 1:
            return [(self.start, self.numel)]
        return [(self.start + i * self.stride, self.length) for i in range(self.count)]

    def indices(self) -> torch.Tensor:
        """Every element index, ascending (for tests and small tensors only)."""
        if not self.numel:
            return torch.empty(0, dtype=torch.long)
        rows = torch.arange(self.count, dtype=torch.long) * self.stride + self.start
        return (rows[:, None] + torch.arange(self.length, dtype=torch.long)[None, :]).reshape(-1)

    def local_index(self, g: int) -> int:
        """How many selected elements lie before global element ``g``."""
        if self.numel == 0 or g <= self.start:
            return 0
        i, off = divmod(g - self.start, self.stride)
        if i >= self.count:
            return self.numel
        return i * self.length + min(off, self.length)

    def to_local(self, a: int, b: int) -> tuple[int, int]:
        """The selected elements inside global ``[a, b)`` as a shard-local range ``[la, lb)`` (always contiguous)."""
        return self.local_index(a), self.local_index(b)

    def to_global(self, la: int, lb: int) -> list["Strided"]:
        """Shard-local ``[la, lb)`` back to global elements: at most three Strided (head run, whole rows, tail run)."""
        if lb <= la:
            return []
        L, out = self.length, []
        i0, o0 = divmod(la, L)
        i1, o1 = divmod(lb, L)
        if i0 == i1:
            return [Strided(self.start + i0 * self.stride + o0, o1 - o0, self.stride, 1)]
        if o0:
            out.append(Strided(self.start + i0 * self.stride + o0, L - o0, self.stride, 1))
            i0 += 1
        if i1 > i0:
            out.append(Strided(self.start + i0 * self.stride, L, self.stride, i1 - i0))
        if o1:
            out.append(Strided(self.start + i1 * self.stride, o1, self.stride, 1))
        return out


def shard_bounds(split: Split, size: int, tp: int, tp_rank: int, name: str = "") -> tuple[int, int]:
    """[lo, hi) along the split dim (checkpoint coordinates) that ``tp_rank`` of ``tp`` holds."""
    if not 0 <= tp_rank < tp:
        raise PlanError(f"{name}: tp rank {tp_rank} outside tp size {tp}")
    if split.kind == "replicated":
        return 0, size
    if split.kind == "even":
        if size % tp:
            raise PlanError(f"{name}: dim {split.dim} of size {size} does not split evenly over tp {tp}")
        per = size // tp
        return tp_rank * per, (tp_rank + 1) * per
    if split.kind == "heads":
        h = split.num_heads
        if size % h:
            raise PlanError(f"{name}: dim {split.dim} of size {size} is not {h} heads")
        head_dim = size // h
        if h % tp == 0:
            per = h // tp
            return tp_rank * per * head_dim, (tp_rank + 1) * per * head_dim
        if split.replicate and tp % h == 0:
            head = tp_rank // (tp // h)  # vLLM: shard_rank = tp_rank // num_kv_head_replicas
            return head * head_dim, (head + 1) * head_dim
        raise PlanError(f"{name}: {h} heads cannot be split over tp {tp}")
    # vocab: vLLM pads the vocab to a multiple of pad_to, then divides the padded rows evenly.
    padded = -(-size // split.pad_to) * split.pad_to
    if padded % tp:
        raise PlanError(f"{name}: padded vocab {padded} does not split evenly over tp {tp}")
    per = padded // tp
    return min(tp_rank * per, size), min((tp_rank + 1) * per, size)


def shard_shape(shape: Sequence[int], split: Split, tp: int, tp_rank: int, name: str = "") -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if split.kind == "replicated":
        return shape
    _check_dim(shape, split, name)
    lo, hi = shard_bounds(split, shape[split.dim], tp, tp_rank, name)
    return shape[:split.dim] + (hi - lo,) + shape[split.dim + 1:]


def _check_dim(shape, split, name):
    if not 0 <= split.dim < len(shape):
        raise PlanError(f"{name}: split dim {split.dim} but the tensor has shape {list(shape)}")


def tp_ranges(shape: Sequence[int], split: Split, tp: int, tp_rank: int, name: str = "") -> Strided:
    """The flat elements of the checkpoint tensor that ``tp_rank`` needs, in row-major order."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if split.kind == "replicated" or n == 0:
        return Strided(0, n, max(n, 1), 1)
    _check_dim(shape, split, name)
    d = split.dim
    lo, hi = shard_bounds(split, shape[d], tp, tp_rank, name)
    inner, outer = math.prod(shape[d + 1:]), math.prod(shape[:d])
    if outer == 1:  # a slab of the leading dim: one contiguous run
        return Strided(lo * inner, (hi - lo) * inner, n, 1)
    if (lo, hi) == (0, shape[d]):  # the whole dim: the whole tensor
        return Strided(0, n, n, 1)
    return Strided(lo * inner, (hi - lo) * inner, shape[d] * inner, outer)


# ---- planning ---------------------------------------------------------------------------------------------------

def shard_pieces(pieces: list[LocalPiece], ranges: dict[str, Strided], shapes: dict[str, tuple[int, ...]]
                 ) -> list[LocalPiece]:
    """Trainer pieces (checkpoint coordinates) -> pieces of the shard tensors (shard-local coordinates).

    A piece that holds none of a shard's elements is dropped, except that a shard with no elements at all (a vocab
    rank past the real vocab) keeps one empty piece per holder so the tensor still travels (as an empty slot).
    """
    out = []
    for p in pieces:
        r = ranges[p.name]
        la, lb = r.to_local(p.start, p.start + p.numel)
        if lb > la or r.numel == 0:
            out.append(LocalPiece(p.name, shapes[p.name], p.dtype, la, lb - la, p.rank))
    return out


@dataclass(frozen=True)
class TpGroup:
    """The receivers that share one tp rank, and the plan that carries exactly their elements."""

    tp_rank: int
    receivers: tuple[int, ...]
    plan: BucketPlan
    ranges: dict[str, Strided]  # checkpoint name -> global flat elements this tp rank needs

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data in this group's plan (``plan.total_bytes`` also counts alignment padding)."""
        return sum(s.numel * itemsize(self.plan.tensors[s.name].dtype) for b in self.plan.buckets for s in b.slots)


@dataclass(frozen=True)
class TpPlan:
    tp_size: int
    full_shapes: dict[str, tuple[int, ...]]  # checkpoint shapes
    wire_dtypes: dict[str, str]
    splits: dict[str, Split]
    groups: dict[int, TpGroup]  # tp rank -> group (only tp ranks that have receivers)
    receiver_tp: tuple[int, ...]  # receiver j -> its tp rank

    @property
    def full_bytes(self) -> int:
        """One copy of the whole model on the wire: what a plain broadcast gives every receiver."""
        return sum(math.prod(s) * itemsize(self.wire_dtypes[n]) for n, s in self.full_shapes.items())

    def bytes_per_tp_rank(self) -> dict[int, int]:
        return {t: g.payload_bytes for t, g in self.groups.items()}

    def bytes_per_receiver(self) -> list[int]:
        per = self.bytes_per_tp_rank()
        return [per[t] for t in self.receiver_tp]

    @property
    def total_bytes(self) -> int:
        """Bytes all trainer ranks put on the wire together (each group's broadcasts once)."""
        return sum(self.bytes_per_tp_rank().values())

    def replicated_bytes(self) -> int:
        """Bytes every tp rank needs whole (replicated tensors)."""
        return sum(math.prod(self.full_shapes[n]) * itemsize(self.wire_dtypes[n])
                   for n, s in self.splits.items() if s.kind == "replicated")

    def steps(self) -> list[tuple[int, int]]:
        """(round, tp rank) in the one order every trainer rank sends in: round by round, tp ranks ascending.

        The same order on every rank is what keeps concurrent groups deadlock-free: a receiver group waits only for
        its own round k, and every sender reaches it after sends that come earlier in this order.
        """
        rounds = max((g.plan.num_rounds for g in self.groups.values()), default=0)
        return [(r, t) for r in range(rounds) for t in sorted(self.groups) if r < self.groups[t].plan.num_rounds]

    def buckets_of(self, src: int) -> list[tuple[int, Bucket | None]]:
        """For trainer rank ``src``: (tp rank, its bucket or None) for every step."""
        mine = {t: g.plan.buckets_of(src) for t, g in self.groups.items()}
        return [(t, mine[t][r]) for r, t in self.steps()]


def plan_tp(pieces: list[LocalPiece], num_senders: int, bucket_bytes: int, layout: TpLayout, tp_size: int,
            receiver_tp: Sequence[int], wire_dtypes: dict[str, str] | None = None,
            aliases: dict[str, tuple[str, ...]] | None = None, align: int = ALIGN) -> TpPlan:
    """Plan a TP-aware push: receiver ``j`` serves tp rank ``receiver_tp[j]`` of a ``tp_size``-way engine.

    Receivers with the same tp rank (one per engine replica) form a group and share one broadcast; each group's
    ``BucketPlan`` covers exactly the elements of its tp rank, in shard shapes, once.
    """
    if tp_size < 1:
        raise PlanError(f"tp size must be >= 1, got {tp_size}")
    bad = [t for t in receiver_tp if not 0 <= t < tp_size]
    if bad:
        raise PlanError(f"receiver tp ranks {sorted(set(bad))} outside tp size {tp_size}")
    meta, _ = merge_pieces(pieces)
    wire = {n: (wire_dtypes or {}).get(n, d) for n, (_, d) in meta.items()}
    splits, errors = {}, []
    for name in meta:
        try:
            splits[name] = layout.split_of(name)
        except PlanError as e:
            errors.append(str(e))
    if errors:
        raise PlanError("TP layout:\n  " + "\n  ".join(errors))
    groups = {}
    for t in sorted(set(receiver_tp)):
        ranges, shapes = {}, {}
        for name, (shape, _) in meta.items():
            ranges[name] = tp_ranges(shape, splits[name], tp_size, t, name)
            shapes[name] = shard_shape(shape, splits[name], tp_size, t, name)
        plan = plan_buckets(shard_pieces(pieces, ranges, shapes), num_senders, bucket_bytes, wire_dtypes, aliases,
                            align)
        groups[t] = TpGroup(t, tuple(j for j, tj in enumerate(receiver_tp) if tj == t), plan, ranges)
    return TpPlan(tp_size, {n: s for n, (s, _) in meta.items()}, wire, splits, groups, tuple(receiver_tp))


def shard_expected(expected: Expected, layout: TpLayout, tp_size: int, tp_rank: int) -> Expected:
    """A receiver's expectations in full checkpoint shapes -> the shard shapes its group's plan carries.

    Then ``plan.check_plan(group.plan, shard_expected(...), who)`` checks a TP-aware plan exactly as a plain one.
    """
    return Expected({n: (shard_shape(s, layout.split_of(n), tp_size, tp_rank, n), d)
                     for n, (s, d) in expected.tensors.items()})


# ---- data path: trainer side ------------------------------------------------------------------------------------

def gather_strided(flat: torch.Tensor, parts: list[Strided], offset: int = 0) -> torch.Tensor:
    """The elements ``parts`` (global indices; ``flat[0]`` is global element ``offset``) as one 1-D tensor.

    A single contiguous part is a view (no copy); strided parts are one strided copy each.
    """
    views = []
    for s in parts:
        if s.numel == 0:
            continue
        lo = s.start - offset
        if s.count == 1 or s.length == s.stride:
            views.append(flat[lo:lo + s.numel])
            continue
        span = flat[lo:lo + (s.count - 1) * s.stride + s.length]
        step = span.stride(0)
        views.append(span.as_strided((s.count, s.length), (s.stride * step, step)).reshape(-1))
    if len(views) == 1:
        return views[0]
    if not views:
        return flat[:0]
    return torch.cat(views)


class ShardSource:
    """A trainer source seen through one tp rank: pieces in shard-local coordinates, ``flat`` gathers them.

    Quacks like ``sources.Source`` for ``pipeline.pack_bucket``: ``rank``, ``world``, ``pieces()``, ``flat(name)``
    (1-D, element 0 = the piece's shard-local start), ``gathering(names)``. For a dim-0 split ``flat`` is a view of
    the inner source's data; for a dim-1 split it is a strided copy of this rank's part of the shard, made once per
    tensor and kept only until the next tensor is asked for.
    """

    def __init__(self, inner, tp_plan: TpPlan, tp_rank: int):
        self.inner, self.group = inner, tp_plan.groups[tp_rank]
        self.rank, self.world = inner.rank, inner.world
        self.aliases = getattr(inner, "aliases", {})
        self._inner_start = {p.name: p.start for p in inner.pieces()}
        self._pieces = {}
        for p in inner.pieces():
            r = self.group.ranges[p.name]
            la, lb = r.to_local(p.start, p.start + p.numel)
            self._pieces[p.name] = (la, lb)
        self._cache: tuple[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def pieces(self) -> list[LocalPiece]:
        shapes = {n: t.shape for n, t in self.group.plan.tensors.items()}
        return [LocalPiece(n, tuple(shapes[n]), self.group.plan.tensors[n].dtype, la, lb - la, self.rank)
                for n, (la, lb) in self._pieces.items() if n in shapes]

    def flat(self, name: str) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        la, lb = self._pieces[name]
        parts = self.group.ranges[name].to_global(la, lb)
        out = gather_strided(self.inner.flat(name), parts, self._inner_start[name])
        self._cache = (name, out)
        return out

    def gathering(self, names: list[str]):
        self._cache = None
        return self.inner.gathering(names)


def wait_limit(timeout):
    """What ``pipeline``'s waits take as their limit: seconds, or an ``errors.Deadline`` where the pipeline wants one.

    Lets ``send_tp`` and a TP-aware receiver's ``pipeline.receive(...)`` call pass a plain number of seconds either way.
    """
    import inspect

    from ..pipeline import loops as pipeline

    if "deadline" not in inspect.signature(pipeline.wait_work).parameters:
        return timeout
    from ..errors import Deadline

    return timeout if isinstance(timeout, Deadline) else Deadline(float(timeout))


def send_tp(tp_plan: TpPlan, source, groups: dict[int, object], pool, num_buffers: int, timeout_s):
    """One trainer rank's send loop over every tp group: ``groups[t]`` is this rank's group with tp rank t's
    receivers (this rank as group rank 0). Buckets go in ``tp_plan.steps()`` order with ``num_buffers`` in flight.

    Receivers of tp rank t run ``pipeline.receive(tp_plan.groups[t].plan, {src: group}, ...)`` unchanged.
    Returns ``pipeline.StageTimes``.
    """
    from ..pipeline.loops import StageTimes, broadcast_bucket, wait_work, pack_bucket

    limit = wait_limit(timeout_s)
    times = StageTimes()
    shard_sources = {t: ShardSource(source, tp_plan, t) for t in tp_plan.groups}
    starts = {t: {p.name: p.start for p in s.pieces()} for t, s in shard_sources.items()}
    largest = max((g.plan.max_bucket_bytes for g in tp_plan.groups.values()), default=0)
    buffers = pool.get(num_buffers, largest)
    inflight: deque = deque()
    names_of = {t: [sorted({s.name for b in rnd for s in b.slots}) for rnd in g.plan.rounds()]
                for t, g in tp_plan.groups.items()}

    def retire() -> None:
        t, bucket, work = inflight.popleft()
        t0 = time.perf_counter()
        wait_work(work, limit, f"tp {t} bucket {bucket.index} (round {bucket.round})",
              f"trainer rank {source.rank} -> tp rank {t} receivers")
        times.transfer += time.perf_counter() - t0

    k = 0
    for (rnd, t), (_, bucket) in zip(tp_plan.steps(), tp_plan.buckets_of(source.rank)):
        if bucket is not None and len(inflight) == num_buffers:
            retire()
        src = shard_sources[t]
        with src.gathering(names_of[t][rnd]):
            if bucket is None:
                continue
            t0 = time.perf_counter()
            buf = buffers[k % num_buffers]
            k += 1
            pack_bucket(bucket, tp_plan.groups[t].plan, src, starts[t], buf)
            times.pack += time.perf_counter() - t0
            inflight.append((t, bucket, broadcast_bucket(groups[t], buf[:bucket.nbytes])))
    while inflight:
        retire()
    return times


# ---- data path: receiver side -----------------------------------------------------------------------------------

def place_shard(full: torch.Tensor, shard: torch.Tensor, split: Split, tp: int, tp_rank: int, name: str = ""
                ) -> torch.Tensor:
    """Write ``shard`` into its place in the checkpoint-shaped ``full`` (returns ``full``)."""
    if split.kind == "replicated":
        return full.copy_(shard.view(full.shape))
    lo, hi = shard_bounds(split, full.shape[split.dim], tp, tp_rank, name)
    full.narrow(split.dim, lo, hi - lo).copy_(shard)
    return full


def loader_tensor(name: str, shard: torch.Tensor, tp_plan: TpPlan, tp_rank: int) -> torch.Tensor:
    """A checkpoint-shaped tensor holding ``shard`` in its place, for vLLM's ``model.load_weights``.

    vLLM's weight loaders take full checkpoint tensors and ``narrow`` them to their tp rank; they never read outside
    their own slab, so the rest of this tensor is left uninitialized (``torch.empty``). Costs one full-shape
    allocation per tensor while applying (not on the wire).
    """
    split = tp_plan.splits[name] if name in tp_plan.splits else None
    if split is None:  # a tied alias: same layout as the tensor it aliases
        primary = next(n for n, g in tp_plan.groups[tp_rank].plan.tensors.items() if name in g.aliases)
        split, shape = tp_plan.splits[primary], tp_plan.full_shapes[primary]
    else:
        shape = tp_plan.full_shapes[name]
    if split.kind == "replicated":
        return shard
    full = torch.empty(shape, dtype=shard.dtype, device=shard.device)
    return place_shard(full, shard, split, tp_plan.tp_size, tp_rank, name)


# ---- groups -----------------------------------------------------------------------------------------------------

def make_tp_groups(store, role: str, rank: int, num_trainers: int, receiver_tp: Sequence[int], backend: str,
                   timeout_s: float) -> dict:
    """The bridging sub-groups of a TP-aware push, built from one (already authenticated) store.

    One group per (trainer rank r, tp rank t): r as group rank 0, then the receivers of tp rank t in receiver order.
    A trainer rank gets ``{t: group}`` (its groups, one per tp rank); receiver ``rank`` gets ``{r: group}`` (one per
    trainer rank, all of its own tp rank), which is what ``pipeline.receive`` takes.
    """
    import torch.distributed as dist

    from ..transport.group import make_group

    members = {t: [j for j, tj in enumerate(receiver_tp) if tj == t] for t in sorted(set(receiver_tp))}
    if role == "trainer":
        return {t: make_group(dist.PrefixStore(f"tp{t}/src{rank}/", store), 0, 1 + len(js), backend, timeout_s)
                for t, js in members.items()}
    t = receiver_tp[rank]
    me = 1 + members[t].index(rank)
    return {r: make_group(dist.PrefixStore(f"tp{t}/src{r}/", store), me, 1 + len(members[t]), backend, timeout_s)
            for r in range(num_trainers)}
