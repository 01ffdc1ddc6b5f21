"""Delta pushes, the trainer side (issue 16): the cache of this rank's last pushed wire bytes and the delta send loop.

``DeltaSender`` (one per Sender) holds the cache (delta.DeltaCache, capped by ``SyncConfig.delta_cache_mb``) of the
buckets this rank packed, keyed by bucket index for one plan (a new plan clears it), and on trainer rank 0 the
receivers' last states. Entries written during a push become the base of its version only once every receiver
acknowledged it (``commit``); a failed push drops them (``abandon``), so those buckets go full next time.

``send_delta`` is pipeline.send with every bucket as two broadcasts on this rank's group: the fixed 48-byte
delta header (which says the body's size) and then the body, the smallest of FULL / BITMASK / INDICES against the
cached base (delta.encode). A bucket without a cached base goes FULL (header + the raw packed bytes). Padding
between slots is zeroed before encoding and caching: receivers count it as zeros in their checksums.
"""
from __future__ import annotations

import json
import time
from collections import deque

import torch

from ..codec import delta as D
from ..plan.delta_policy import DeltaDecision, bucket_word, delta_allowed, padding_ranges, plan_digest
from ..errors import Deadline, SyncError
from .loops import BufferPool, StageTimes, broadcast_bucket, pack_bucket, round_names, wait_work
from ..plan.buckets import Bucket, BucketPlan, dtype_of
from ..protocol.messages import Keys
from ..transport.group import wait_keys
from ..sources.base import Source
from .delta_recv import settle


class DeltaSender:
    def __init__(self, mode: str, cap_bytes: int | None):
        self.mode = mode
        self.cache = D.DeltaCache(cap_bytes)
        self.digest: str | None = None
        self.receivers: list[dict | None] | None = None  # rank 0: each receiver's last state (this epoch)
        self._pads: dict[int, list[tuple[int, int]]] = {}
        self._words: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # --- rank 0: the decision ----------------------------------------------------------------------------------
    def connected(self) -> None:
        """A new bridging group: the receivers' states are read again from their join."""
        self.receivers = None

    def decide(self, store, num_receivers: int, plan_json: str, ipc: bool, base: int) -> dict:
        if self.receivers is None:
            keys = [Keys.delta_state(j) for j in range(num_receivers)]
            self.receivers = [json.loads(store.get(k)) if store.check([k]) else None for k in keys]
        else:
            self._reread_late(store)
        return delta_allowed(self.mode, ipc, base, plan_digest(plan_json), self.receivers).to_json()

    def _reread_late(self, store) -> None:
        """A receiver that adopts targets at run time (Receiver(adopts_targets=True)) may have adopted or dropped
        them after its acknowledgement; it said so (``late``) and keeps its newest state under its join key. Read
        that key again (it exists since the receiver joined: a check and a get, no wait)."""
        for j, st in enumerate(self.receivers):
            if st and st.get("late") and store.check([Keys.delta_state(j)]):
                self.receivers[j] = json.loads(store.get(Keys.delta_state(j)))

    def annotate(self, msg: dict, store, num_receivers: int, layout, base: int) -> dict:
        """Rank 0: the plan message with this push's delta decision (an error message stays as it is)."""
        if "plan" not in msg:
            return msg
        return {**msg, "delta": self.decide(store, num_receivers, msg["plan"], any(layout.local), base)}

    def acknowledged(self, acks: list[dict]) -> None:
        self.receivers = [a.get("delta_state") for a in acks]

    # --- every rank: the cache ---------------------------------------------------------------------------------
    def begin(self, plan_json: str, plan: BucketPlan) -> None:
        digest = plan_digest(plan_json)
        if digest != self.digest:
            self.cache.clear()
            self.digest = digest
            sizes = {n: dtype_of(t.dtype).itemsize for n, t in plan.tensors.items()}
            self._pads = {b.index: padding_ranges(b, sizes) for b in plan.buckets}
            self._words = {b.index: bucket_word(b, sizes) for b in plan.buckets}

    def pads(self, bucket: Bucket) -> list[tuple[int, int]]:
        return self._pads[bucket.index]

    def word(self, bucket: Bucket) -> int:
        return self._words[bucket.index]

    def keep(self, bucket: Bucket, buf: torch.Tensor, target: D.Sums | None = None) -> None:
        """Cache this push's packed bytes of ``bucket`` (padding zeroed in the copy), not yet acknowledged."""
        if not self.cache.store(bucket.index, buf, D.Sums((0, 0, 0))):
            return
        entry = self.cache.entries[bucket.index]
        for lo, hi in self.pads(bucket):
            entry.data[lo:hi].zero_()
        entry.sums = target if target is not None else D.sums(entry.data)

    def advance(self, bucket: Bucket, enc: torch.Tensor, st: D.DeltaStats) -> None:
        """Make the cached base of ``bucket`` this push's bytes by writing only the changed words of the delta
        ``enc`` into it (O(changed), instead of copying the bucket), not yet acknowledged."""
        entry = self.cache.entries[bucket.index]
        if st.prev_updated:  # the encoder already wrote the changed words into the entry (native scan)
            pass
        elif st.kind == D.FULL:
            entry.data.copy_(enc[D.HEADER_BYTES:])
        elif st.changed:
            _, pos, vals = D.changes(enc)
            entry.data.view(vals.dtype).index_copy_(0, pos, vals)  # fillers rewrite unchanged words: no-ops
        entry.sums, entry.version = st.target, None

    def commit(self, version: int) -> None:
        self.cache.commit(version)

    def abandon(self) -> None:
        self.cache.abandon()


def _header_tensor(h: D.Header, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(h.pack()), dtype=torch.uint8).to(device)


def send_delta(plan: BucketPlan, source: Source, group, pool: BufferPool, num_buffers: int, deadline: Deadline,
               ds: DeltaSender, decision: DeltaDecision, on_packed=None) -> tuple[StageTimes, dict]:
    """Send this rank's buckets as deltas against version ``decision.base`` (see the module docstring). Returns
    the stage times and this rank's stats: bytes sent (headers included), full bytes, changed and compared
    elements, encodings chosen."""
    times = StageTimes()
    stats = {"sent": 0, "full": 0, "changed": 0, "elements": 0, "kinds": {}}
    mine = plan.buckets_of(source.rank)
    starts = {p.name: p.start for p in source.pieces()}
    buffers = pool.get(num_buffers, plan.max_bucket_bytes)
    inflight: deque = deque()

    def retire() -> None:
        bucket, works, _ = inflight.popleft()
        t = time.perf_counter()
        for w in works:
            wait_work(w, deadline, f"delta bucket {bucket.index} (round {bucket.round})",
                      f"trainer rank {source.rank} -> receivers")
        times.transfer += time.perf_counter() - t

    failure = None
    try:
        for rnd, names in enumerate(round_names(plan)):
            bucket = mine[rnd]
            if bucket is not None and len(inflight) == num_buffers:
                retire()
            with source.gathering(names):
                if bucket is None:
                    continue
                t = time.perf_counter()
                full = buffers[rnd % num_buffers]
                pack_bucket(bucket, plan, source, starts, full)
                buf = full[:bucket.nbytes]
                for lo, hi in ds.pads(bucket):
                    buf[lo:hi].zero_()
                word = ds.word(bucket)
                cached = ds.cache.base(bucket.index, bucket.nbytes, decision.base)
                if cached is not None:
                    # before the encoder may overwrite it in place (CPU: the changed words are written during
                    # the same pass that finds them)
                    ds.cache.overwriting(bucket.index)
                    enc, st = D.encode(cached[0], buf, word=word, base=cached[1], update_prev=True)
                    header, body, target = enc[:D.HEADER_BYTES], enc[D.HEADER_BYTES:], st.target
                    kind = D.KIND_NAMES[st.kind]
                    stats["changed"] += st.changed
                    stats["elements"] += st.n
                else:  # no base for this bucket (past the cache's cap, or dropped after a failed push)
                    enc, target, kind = None, D.sums(buf), "uncached"
                    n = bucket.nbytes // word
                    header = _header_tensor(D.Header(D.FULL, word, 0, n, n, 0, target.mixed,
                                                     D.HEADER_BYTES + bucket.nbytes), buf.device)
                    body = buf
                times.pack += time.perf_counter() - t
                # an empty body (nothing changed, no fillers) is not broadcast: the header says its size
                works = [broadcast_bucket(group, header)] + ([broadcast_bucket(group, body)] if body.numel() else [])
                inflight.append((bucket, works, (header, enc)))
                t = time.perf_counter()
                if enc is not None:  # while the bucket is on the wire
                    ds.advance(bucket, enc, st)
                else:
                    ds.keep(bucket, buf, target)
                if on_packed is not None:
                    on_packed(bucket, buf)
                times.pack += time.perf_counter() - t
                stats["sent"] += D.HEADER_BYTES + body.numel()
                stats["full"] += bucket.nbytes
                stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        while inflight:
            retire()
    except SyncError as e:
        failure = (type(e), str(e), e.stage, e.who)
    if failure is not None:  # raised outside the handler, in-flight work dropped (see pipeline.send)
        inflight.clear()
        raise failure[0](*failure[1:])
    return times, stats


def transfer(ds: DeltaSender, plan: BucketPlan, msg: dict, full, source: Source, group, pool: BufferPool,
             deadline: Deadline, store, p: str, num_receivers: int, timeout_s: float, abort_key: str,
             ipc: bool, on_packed=None) -> tuple[StageTimes, dict]:
    """One push of this trainer rank's buckets: as deltas when rank 0 decided so (then the receivers' verdicts and,
    if one refused, the same push again full at once), else ``full(on_packed)`` (the ordinary send), caching the
    packed buckets as the next push's base. Returns the stage times and this rank's stats (``full_reason`` too)."""
    decision = DeltaDecision.from_json(msg.get("delta"))
    keep = None
    if not (ds.enabled and not ipc and decision.keep):
        ds.cache.clear()  # no receiver could take a delta against this push: nothing worth its memory and copies
    else:
        ds.begin(msg["plan"], plan)

        def keep(bucket, buf):
            ds.keep(bucket, buf)
            if on_packed is not None:
                on_packed(bucket, buf)
    if not decision.on:
        times = full(keep or on_packed)
        return times, {"sent": plan_bytes(plan, source.rank), "full": plan_bytes(plan, source.rank), "changed": 0,
                       "elements": 0, "kinds": {}, "full_reason": decision.reason}
    times, stats = send_delta(plan, source, group, pool, msg["num_buffers"], deadline, ds, decision, on_packed)
    refusals = settle(store, p, num_receivers, timeout_s, abort_key, f"trainer rank {source.rank}")
    stats["full_reason"] = None
    if refusals:  # a receiver was not at the base after all: the same push again, full, to everyone
        again = full(keep)
        times = StageTimes(times.pack + again.pack, times.transfer + again.transfer, times.apply)
        stats["sent"] += plan_bytes(plan, source.rank)
        stats["full_reason"] = "delta refused, resent full: " + "; ".join(refusals)
    return times, stats


def plan_bytes(plan: BucketPlan, rank: int) -> int:
    return sum(b.nbytes for b in plan.buckets if b.src == rank)


def report_fields(store, p: str, world: int, rank: int, stats: dict, timeout_s: float) -> dict:
    """Every trainer rank's stats of push ``p`` summed (each rank published its own): the SyncReport's delta
    fields, the same on every rank."""
    store.set(Keys.delta_stats(p, rank), json.dumps(stats))
    keys = [Keys.delta_stats(p, r) for r in range(world)]
    if wait_keys(store, keys, timeout_s):
        raise SyncError(f"trainer rank {rank}: the other trainer ranks' push stats did not arrive within "
                        f"{timeout_s:g}s", stage="apply")
    every = [json.loads(store.get(k)) for k in keys]
    elements = sum(s["elements"] for s in every)
    reason = next((s["full_reason"] for s in every if s.get("full_reason")), None)
    return {"bytes_sent": sum(s["sent"] for s in every), "bytes_full": sum(s["full"] for s in every),
            "changed_fraction": sum(s["changed"] for s in every) / elements if elements else None,
            "full_reason": reason}
