"""The trainer's cache of its last pushed wire bytes: the base of the next push's deltas (issue 16).

Each trainer rank keeps the last pushed wire bytes of its own buckets (its shard only, in the wire dtype), keyed by
bucket index for one plan (a new plan clears it), on the device of its pack buffers, capped by
``SyncConfig.delta_cache_mb`` (buckets past the cap go FULL). A delta bucket advances its entry in place (only the
changed words); entries become the base of a version only once every receiver acknowledged it (``commit``), a failed
push drops what it overwrote (``abandon``). ``DeltaSendState`` (one per Sender) holds it with the plan's padding
and word sizes; the delta codec (codec/delta/codec.py) encodes against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...plan.buckets import Bucket, BucketPlan, dtype_of
from ...plan.delta_policy import bucket_word, padding_ranges, plan_digest
from .checksums import Sums, sums
from .decode import changes
from .format import FULL, HEADER_BYTES, DeltaStats


@dataclass
class _Entry:
    data: torch.Tensor  # the wire bytes last pushed for this bucket
    sums: Sums
    version: int | None  # None: overwritten by a push not yet acknowledged


class DeltaCache:
    """The trainer's last pushed wire bytes of its own buckets: the base of the next push's deltas (phase 2).

    One copy of this rank's buckets in the wire dtype, on ``device``, admitted in the order buckets are first seen
    until ``cap_bytes`` (None: no cap); a bucket past the cap is never cached and always travels full. A push
    overwrites each entry as it packs (no second copy): ``commit(version)`` after every receiver acknowledged makes
    them the base of ``version``; ``abandon()`` after a failure drops the entries that push overwrote (their bytes
    belong to no acknowledged version), so those buckets go full next time. ``clear()`` when the plan changes."""

    def __init__(self, cap_bytes: int | None = None, device: torch.device | str | None = None):
        self.cap_bytes = cap_bytes
        self.device = torch.device(device) if device is not None else None
        self.entries: dict[object, _Entry] = {}
        self.refused: set = set()  # keys past the cap

    @property
    def nbytes(self) -> int:
        return sum(e.data.numel() for e in self.entries.values())

    def base(self, key, nbytes: int, version: int) -> tuple[torch.Tensor, Sums] | None:
        """The cached bytes and sums of bucket ``key`` if they are exactly version ``version`` and ``nbytes`` long."""
        e = self.entries.get(key)
        if e is None or e.version != version or e.data.numel() != nbytes:
            return None
        return e.data, e.sums

    def store(self, key, data: torch.Tensor, sums_: Sums | None = None) -> bool:
        """Keep ``data`` (flat bytes of any dtype, copied) as bucket ``key``'s newest, not yet acknowledged bytes;
        False when the cap leaves no room for it."""
        raw = data.reshape(-1).view(torch.uint8)
        e = self.entries.get(key)
        if e is None or e.data.numel() != raw.numel():
            if key in self.refused:
                return False
            have = self.nbytes - (e.data.numel() if e is not None else 0)
            if self.cap_bytes is not None and have + raw.numel() > self.cap_bytes:
                self.entries.pop(key, None)
                self.refused.add(key)
                return False
            e = _Entry(torch.empty(raw.numel(), dtype=torch.uint8, device=self.device or raw.device), Sums((0, 0, 0)),
                       None)
            self.entries[key] = e
        e.data.copy_(raw, non_blocking=False)
        e.sums = sums_ if sums_ is not None else sums(e.data)
        e.version = None
        return True

    def overwriting(self, key) -> None:
        """Bucket ``key``'s entry is about to be overwritten in place by this push: it holds no acknowledged
        version from now on (a push failing half way leaves no entry claiming a version it no longer holds)."""
        self.entries[key].version = None

    def commit(self, version: int) -> None:
        for e in self.entries.values():
            if e.version is None:
                e.version = version

    def abandon(self) -> None:
        self.entries = {k: e for k, e in self.entries.items() if e.version is not None}

    def clear(self) -> None:
        self.entries.clear()
        self.refused.clear()


class DeltaSendState:
    """One trainer rank's delta state across pushes (one per Sender): the cache (capped by
    ``SyncConfig.delta_cache_mb``) of the buckets this rank packed, keyed by bucket index for one plan (a new plan
    clears it), and each bucket's padding and word size. Entries written during a push become the base of its
    version only once every receiver acknowledged it (``commit``); a failed push drops them (``abandon``), so those
    buckets go full next time. Padding between slots is zeroed before encoding and caching: receivers count it as
    zeros in their checksums."""

    def __init__(self, mode: str, cap_bytes: int | None):
        self.mode = mode
        self.cache = DeltaCache(cap_bytes)
        self.digest: str | None = None
        self._pads: dict[int, list[tuple[int, int]]] = {}
        self._words: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

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

    def keep(self, bucket: Bucket, buf: torch.Tensor, target: Sums | None = None) -> None:
        """Cache this push's packed bytes of ``bucket`` (padding zeroed in the copy), not yet acknowledged."""
        if not self.cache.store(bucket.index, buf, Sums((0, 0, 0))):
            return
        entry = self.cache.entries[bucket.index]
        for lo, hi in self.pads(bucket):
            entry.data[lo:hi].zero_()
        entry.sums = target if target is not None else sums(entry.data)

    def advance(self, bucket: Bucket, enc: torch.Tensor, st: DeltaStats) -> None:
        """Make the cached base of ``bucket`` this push's bytes by writing only the changed words of the delta
        ``enc`` into it (O(changed), instead of copying the bucket), not yet acknowledged."""
        entry = self.cache.entries[bucket.index]
        if st.prev_updated:  # the encoder already wrote the changed words into the entry (native scan)
            pass
        elif st.kind == FULL:
            entry.data.copy_(enc[HEADER_BYTES:])
        elif st.changed:
            _, pos, vals = changes(enc)
            entry.data.view(vals.dtype).index_copy_(0, pos, vals)  # fillers rewrite unchanged words: no-ops
        entry.sums, entry.version = st.target, None

    def commit(self, version: int) -> None:
        self.cache.commit(version)

    def abandon(self) -> None:
        self.cache.abandon()
