"""What trainer and receivers say about delta pushes (issue 16), and nothing else.

* ``DeltaState``: what a receiver holds for deltas, published under ``Keys.delta_state`` when it joins (and again
  when it adopts or drops targets) and carried by every ``Ack``; trainer rank 0 decides each push from them
  (plan/delta_policy.delta_allowed).
* ``PushStats``: one trainer rank's bytes sent / full bytes / changed elements of a push (``Keys.delta_stats``),
  filled in by the codec as the push goes and summed over the ranks into the SyncReport.

Only the standard library (a vLLM worker imports this to join).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .wire import PROTOCOL_VERSION


@dataclass(frozen=True)
class DeltaState:
    """A receiver's delta state: version ``version`` of the plan ``digest`` (plan/delta_policy.plan_digest; None:
    nothing held), whether it can apply a delta to it (``ok``; else ``why`` not), and ``late``: its state can change
    after its acknowledgement (a receiver that adopts targets at run time), so trainer rank 0 reads it again from
    the join key before the next push."""

    digest: str | None = None
    version: int | None = None
    ok: bool = False
    why: str = ""
    late: bool = False
    protocol_version: int = PROTOCOL_VERSION


@dataclass
class PushStats:
    """One trainer rank's account of one push: bytes it sent per receiver (delta headers included), what a full
    push would have sent, changed and compared wire elements, the encodings chosen per bucket (kind -> count), and
    why the push went full (None when it went as deltas). Mutable: the codec counts into it as buckets go."""

    sent: int = 0
    full: int = 0
    changed: int = 0
    elements: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    full_reason: str | None = None
    protocol_version: int = PROTOCOL_VERSION
