"""Delta pushes, the pure part (issue 16): whether a push may go as deltas, and the bucket geometry both sides need.

``delta_allowed`` is trainer rank 0's decision per push, from data alone: a push may carry deltas only when every
receiver says it holds exactly the trainer's base version (the last push every receiver acknowledged) of the same
plan, in a destination it can apply deltas to. Anything else (delta off, CUDA IPC, the first push, a receiver that
joined late, missed a push, restarted, or cannot keep a copy) gives a full push and says why. The senders still pick
per bucket (a bucket whose cached base is missing, e.g. past ``delta_cache_mb``, travels FULL inside a delta push).

A receiver's state is a ``DeltaState`` message (protocol/delta.py: digest, version, ok, why, late), published when
it joins and with every acknowledgement.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..protocol.delta import DeltaState
from .buckets import Bucket

DELTA_MODES = ("auto", "off")


def plan_digest(plan_json: str) -> str:
    """A short name of a plan (its JSON text): a delta's base is only valid for the same buckets."""
    return hashlib.sha1(plan_json.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DeltaDecision:
    on: bool
    base: int  # the version deltas are computed against (meaningful when on)
    reason: str | None  # why the push goes full (None when on)
    keep: bool = True  # whether the senders cache this push as the next one's base (False: no receiver could use it)

    def to_json(self) -> dict:
        return {"on": self.on, "base": self.base, "reason": self.reason, "keep": self.keep}

    @classmethod
    def from_json(cls, d: dict | None) -> "DeltaDecision":
        if not d:
            return cls(False, 0, "delta not negotiated", False)
        return cls(bool(d["on"]), int(d["base"]), d.get("reason"), bool(d.get("keep", True)))


def delta_allowed(mode: str, ipc: bool, base: int, digest: str, receivers: list[DeltaState | None]
                  ) -> DeltaDecision:
    """Trainer rank 0, per push: deltas against version ``base`` (the trainer's last acknowledged push; 0: none yet)
    of plan ``digest``, or a full push and why. ``receivers[j]``: receiver j's last state (None: it said nothing,
    an old receiver). ``ipc``: some hop goes by CUDA IPC (same-GPU copies gain nothing from a delta)."""
    if mode not in DELTA_MODES:
        raise ValueError(f"SyncConfig.delta must be one of {DELTA_MODES}, got {mode!r}")
    if mode == "off":
        return DeltaDecision(False, base, "delta off (SyncConfig.delta)", False)
    if ipc:
        return DeltaDecision(False, base, "CUDA IPC push (same-GPU copies always go full)", False)
    # Caching this push only pays if every receiver can take deltas at all (else it costs a copy per push for nothing)
    keep = all(st is not None and st.ok for st in receivers)
    if base <= 0:
        return DeltaDecision(False, base, "first push (no base version yet)", keep)
    problems = []
    for j, st in enumerate(receivers):
        if st is not None and (not st.ok or (st.version is None and st.why)):
            # its own reason first: "holds no version" would hide why (no mirror, no targets adopted yet, ...)
            problems.append(f"receiver {j} cannot apply deltas ({st.why or 'no reason given'})")
        elif st is None or st.version is None:
            problems.append(f"receiver {j} holds no version (joined late or restarted)")
        elif st.version != base:
            problems.append(f"receiver {j} holds version {st.version}, not the base version {base} "
                            f"(it missed a push)")
        elif st.digest != digest:
            problems.append(f"receiver {j} holds version {base} of another plan (the tensors or buckets changed)")
    if problems:
        return DeltaDecision(False, base, "; ".join(problems), keep)
    return DeltaDecision(True, base, None, True)


def padding_ranges(bucket: Bucket, itemsizes: dict[str, int]) -> list[tuple[int, int]]:
    """Byte ranges ``[lo, hi)`` of ``bucket`` that no slot covers (alignment padding). The sender zeroes them: a
    receiver's checksums count them as zeros (delta.apply_segments)."""
    out, at = [], 0
    for s in sorted(bucket.slots, key=lambda s: s.offset):
        if s.offset > at:
            out.append((at, s.offset))
        at = max(at, s.offset + s.numel * itemsizes[s.name])
    if at < bucket.nbytes:
        out.append((at, bucket.nbytes))
    return out


def bucket_word(bucket: Bucket, itemsizes: dict[str, int]) -> int:
    """The delta word size of a bucket: 2 bytes (a bf16/fp16 element; exact for wider dtypes too) when the bucket
    and every slot in it are a whole number of 2-byte words, else 1 (odd-sized 1-byte tensors, e.g. fp8)."""
    even = bucket.nbytes % 2 == 0 and all(s.numel * itemsizes[s.name] % 2 == 0 for s in bucket.slots)
    return 2 if even else 1
