"""The verdict round: after a pass whose codec needs something of the receivers (a delta: that they hold its
base), every member learns who refused it, so that all of them run the same push again as a full pass together.

Each receiver writes its verdict (``Keys.delta_ack``: why it refused, or nothing) once its pass is received; every
trainer rank and receiver then reads all of them (``settle``): the same list everywhere, so nobody waits for a
resend that does not come. pipeline.send and pipeline.receive run it between the pass and the resend.
"""
from __future__ import annotations

from ..errors import SyncError
from ..protocol import wire
from ..protocol.messages import Keys, PassVerdict
from ..transport.group import wait_keys


class VerdictRound:
    """The verdict round of push ``p`` among ``num_receivers`` receivers, on the bridging store."""

    def __init__(self, store, p: str, num_receivers: int, timeout_s: float, abort_key: str, who: str,
                 receiver_rank: int | None = None):
        self.store, self.p, self.num_receivers, self.receiver_rank = store, p, num_receivers, receiver_rank
        self.timeout_s, self.abort_key, self.who = timeout_s, abort_key, who

    def tell(self, refused: str | None) -> None:
        """This receiver's verdict on the pass it just received (``refused``: why not, or None)."""
        self.store.set(Keys.delta_ack(self.p, self.receiver_rank), wire.encode(PassVerdict(refused)))

    def settle(self) -> list[str]:
        """Every receiver's refusal ("receiver j: why"), the same list on every member (empty: all took it)."""
        keys = [Keys.delta_ack(self.p, j) for j in range(self.num_receivers)]
        missing = wait_keys(self.store, keys, self.timeout_s, abort_key=self.abort_key, stage="apply",
                            max_pause_s=1e-3)
        if missing:
            names = ", ".join(f"receiver {k.rsplit('/', 1)[1]}" for k in missing)
            raise SyncError(f"{self.who}: no verdict on the delta push from {names} within {self.timeout_s:g}s",
                            stage="apply", who=names)
        out = []
        for j, k in enumerate(keys):
            why = wire.decode(self.store.get(k), PassVerdict, stage="apply").refused
            if why:
                out.append(f"receiver {j}: {why}")
        return out
