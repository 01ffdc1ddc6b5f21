"""Agreement between trainer ranks: rank 0 decides (it alone talks to the engines), every rank gets its
``protocol.Verdict`` through one tiny broadcast and raises the same error."""
from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from ..errors import SyncError
from ..protocol import wire
from ..protocol.messages import Verdict


class Agreement:
    """WeightSync's rank agreement (a mixin: needs ``rank`` and ``world``)."""

    def _agree(self, fn: Callable[[], Verdict | None]) -> Verdict:
        """Run ``fn`` on rank 0 and give its verdict (protocol.Verdict) to every rank.

        Any exception in ``fn`` becomes an error verdict, so rank 0 always reaches the broadcast.
        """
        out: Verdict | None = None
        if self.rank == 0:
            try:
                out = fn() or Verdict()
            except SyncError as e:
                out = Verdict(str(e), e.stage, e.who, members=list(e.members), dead=list(e.dead))
            except Exception as e:  # noqa: BLE001 - becomes the error every rank raises
                out = Verdict(f"{type(e).__name__}: {e}")
        if self.world > 1:  # as protocol JSON (wire.py), checked on every rank like any other message
            box = [wire.encode(out) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            out = wire.decode(box[0], Verdict)
        return out

    @staticmethod
    def _raise(verdict: Verdict, cause: BaseException | None = None) -> None:
        if verdict.failed:
            raise SyncError(verdict.error, verdict.stage, verdict.who, members=verdict.members or None,
                            dead=verdict.dead) from cause
