"""Delta pushes, the trainer's decisions around the codec (issue 16): whether a push goes as deltas, and its report.

Trainer rank 0 allows deltas against its last acknowledged version only when every receiver said (when it joined,
then with every acknowledgement) that it holds that version of the same plan in a destination it can apply deltas
to (plan/delta_policy.delta_allowed); the decision travels with the plan message. Every rank then makes the push's
codec from it (``codec_for``): the delta codec (codec/delta/codec.py) against its cache, or the plain one when no
receiver could take a delta against this push (its cache is then dropped: nothing worth its memory and copies).
"""
from __future__ import annotations

import dataclasses

from ..codec.base import Codec
from ..codec.delta.cache import DeltaSendState
from ..codec.delta.codec import DeltaSend
from ..codec.plain import PLAIN
from ..errors import SyncError
from ..plan.buckets import BucketPlan
from ..plan.delta_policy import DeltaDecision, delta_allowed, plan_digest
from ..protocol import wire
from ..protocol.delta import DeltaState, PushStats
from ..protocol.messages import Ack, Keys, PlanOffer, PlanRefusal
from ..transport.group import wait_keys


class DeltaPushes:
    """One Sender's delta side: this rank's ``DeltaSendState`` (the cache) and, on trainer rank 0, the receivers'
    last states (this epoch)."""

    def __init__(self, mode: str, cap_bytes: int | None):
        self.state = DeltaSendState(mode, cap_bytes)
        self.receivers: list[DeltaState | None] | None = None

    def connected(self) -> None:
        """A new bridging group: the receivers' states are read again from their join."""
        self.receivers = None

    def decide(self, store, num_receivers: int, plan_json: str, ipc: bool, base: int) -> dict:
        if self.receivers is None:
            self.receivers = [wire.read_if(store, Keys.delta_state(j), DeltaState, stage="handshake")
                              for j in range(num_receivers)]
        else:
            self._reread_late(store)
        return delta_allowed(self.state.mode, ipc, base, plan_digest(plan_json), self.receivers).to_json()

    def _reread_late(self, store) -> None:
        """A receiver that adopts targets at run time (Receiver(adopts_targets=True)) may have adopted or dropped
        them after its acknowledgement; it said so (``late``) and keeps its newest state under its join key. Read
        that key again (it exists since the receiver joined: a check and a get, no wait)."""
        for j, st in enumerate(self.receivers):
            if st is not None and st.late and store.check([Keys.delta_state(j)]):
                self.receivers[j] = wire.read(store, Keys.delta_state(j), DeltaState, stage="handshake")

    def annotate(self, msg: PlanOffer | PlanRefusal, store, num_receivers: int, layout, base: int
                 ) -> PlanOffer | PlanRefusal:
        """Rank 0: the plan offer with this push's delta decision (a refusal stays as it is)."""
        if not isinstance(msg, PlanOffer):
            return msg
        return dataclasses.replace(msg, delta=self.decide(store, num_receivers, msg.plan, any(layout.local), base))

    def acknowledged(self, acks: list[Ack]) -> None:
        self.receivers = [a.delta_state for a in acks]

    def codec_for(self, plan: BucketPlan, msg: PlanOffer, ipc: bool, rank: int) -> tuple[Codec, PushStats]:
        """This push's codec and this rank's stats (filled in by the codec as the push goes)."""
        decision = DeltaDecision.from_json(msg.delta)
        if not (self.state.enabled and not ipc and decision.keep):
            self.state.cache.clear()  # no receiver could take a delta against this push
            n = sum(b.nbytes for b in plan.buckets if b.src == rank)
            return PLAIN, PushStats(n, n, full_reason=decision.reason)
        self.state.begin(msg.plan, plan)
        codec = DeltaSend(self.state, decision, plan, rank)
        return codec, codec.stats

    def commit(self, version: int) -> None:
        self.state.commit(version)

    def abandon(self) -> None:
        self.state.abandon()


def report_fields(store, p: str, world: int, rank: int, stats: PushStats, timeout_s: float) -> dict:
    """Every trainer rank's stats of push ``p`` summed (each rank published its own): the SyncReport's delta
    fields, the same on every rank."""
    wire.put(store, Keys.delta_stats(p, rank), stats)
    keys = [Keys.delta_stats(p, r) for r in range(world)]
    if wait_keys(store, keys, timeout_s):
        raise SyncError(f"trainer rank {rank}: the other trainer ranks' push stats did not arrive within "
                        f"{timeout_s:g}s", stage="apply")
    every = [wire.read(store, k, PushStats, stage="apply") for k in keys]
    elements = sum(s.elements for s in every)
    reason = next((s.full_reason for s in every if s.full_reason), None)
    return {"bytes_sent": sum(s.sent for s in every), "bytes_full": sum(s.full for s in every),
            "changed_fraction": sum(s.changed for s in every) / elements if elements else None,
            "full_reason": reason}
