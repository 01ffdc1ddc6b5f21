"""Agreement between trainer ranks: rank 0 decides (it alone talks to the engines), every rank gets its
``protocol.Verdict`` through one tiny broadcast and raises the same error; engine calls run in daemon threads."""
from __future__ import annotations

import threading
from typing import Callable

import torch.distributed as dist

from ..errors import SyncError
from ..engines.clients import EngineCallError
from ..protocol.messages import Verdict


# vLLM call -> the stage a failure of it is reported under.
_STAGE = {"get_world_size": "rendezvous", "init_weight_transfer_engine": "rendezvous", "pause": "pause",
          "start_weight_update": "start", "update_weights": "transfer", "finish_weight_update": "finish",
          "reset_prefix_cache": "finish", "resume": "resume"}


def _stage(e: EngineCallError) -> str:
    return _STAGE.get(e.call, e.call)


class _Background:
    """Run one engine call in a daemon thread (a thread stuck in a dead engine must not block interpreter exit).

    ``on_error(e)`` runs in that thread as soon as the call fails: it aborts the rendezvous or push the call belongs
    to, so that no trainer rank waits out its timeout for an engine that already gave up."""

    def __init__(self, fn: Callable[[], None], on_error: Callable[[BaseException], None] | None = None):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, on_error), daemon=True)
        self._thread.start()

    def _run(self, fn, on_error) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
            if on_error is not None:
                on_error(e)

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


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
        if self.world > 1:
            box = [out]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        return out

    @staticmethod
    def _raise(verdict: Verdict, cause: BaseException | None = None) -> None:
        if verdict.failed:
            raise SyncError(verdict.error, verdict.stage, verdict.who, members=verdict.members or None,
                            dead=verdict.dead) from cause
