"""Engine calls as rank 0 makes them: each in a daemon thread (``Background``), and a failed call reported under the
stage of the push it belongs to (``stage_of``). Shared by membership.py (rendezvous) and push.py (a push)."""
from __future__ import annotations

import threading
from typing import Callable

from ..engines.clients import EngineCallError


# vLLM call -> the stage a failure of it is reported under.
STAGE_OF_CALL = {"get_world_size": "rendezvous", "init_weight_transfer_engine": "rendezvous", "pause": "pause",
                 "start_weight_update": "start", "update_weights": "transfer", "finish_weight_update": "finish",
                 "reset_prefix_cache": "finish", "resume": "resume"}


def stage_of(e: EngineCallError) -> str:
    """The push stage a failed engine call is reported under (the call's own name if it has none)."""
    return STAGE_OF_CALL.get(e.call, e.call)


class Background:
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
