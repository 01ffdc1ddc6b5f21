"""Errors a sync can end in. Each names who (rank, receiver, engine) and at which stage it failed."""
from __future__ import annotations


class SyncError(RuntimeError):
    """A push or receive failed. ``stage`` is one of rendezvous, handshake, transfer, apply, finish; ``who`` names the
    peer at fault (``"receiver 1"``, ``"trainer rank 0"``, ``"engine http://host:8000"``) where it is known.

    As data, never to be parsed back out of the text: ``members``, every peer the error names (``who`` is them
    joined for people); ``receivers``, the receiver ranks among them (a refused token, a mismatched plan); ``dead``,
    the engines WeightSync found dead while the push failed (they left the membership); ``parameter``, the tensor at
    fault where one is known."""

    def __init__(self, message: str, stage: str = "", who: str = "", *, members: list[str] | None = None,
                 receivers: list[int] | None = None, dead: list[str] | None = None, parameter: str = ""):
        super().__init__(message)
        self.stage = stage
        self.who = who
        self.parameter = parameter
        self.members: list[str] = list(members) if members is not None else ([who] if who else [])
        self.receivers: list[int] = list(receivers or [])
        self.dead: list[str] = list(dead or [])


class RendezvousRefused(SyncError, PermissionError):
    """A peer presented the wrong token (or none) and was not let into the group."""


class EngineHeld(SyncError):
    """An engine refused a join because another trainer holds it and is still alive (see engines/vllm/backend.py)."""


# An engine's update_weights error message ends with this (for people) when no worker of the engine had applied any
# weight of the push; the trainer decides by the error's typed kind (protocol.messages.ErrorKind.UNTOUCHED), never by
# this text: the engine still serves its old weights whole, so it is resumed instead of left paused.
UNTOUCHED = "[trainer_sync: no weight was applied, the engine serves its old weights]"


class HandshakeMismatch(SyncError, ValueError):
    """The trainer's tensors do not match what a receiver expects; nothing was sent."""

    def __init__(self, mismatches: list[str], receivers: list[int] | None = None):
        super().__init__("trainer_sync handshake failed, nothing was sent:\n  " + "\n  ".join(mismatches),
                         stage="handshake", receivers=receivers)
        self.mismatches = list(mismatches)


class Aborted(SyncError):
    """Another member gave up on this push (an engine failed, say) and said why; raised at once by every wait."""


class Deadline:
    """Time left for one wait: the smaller of the per-wait cap and what remains of the whole operation.

    ``abort``: a callable returning the reason another member gave up on this operation, or None. Waits that can
    poll (gloo work, the acknowledgements, IPC counters) call ``check()`` every few milliseconds, so a push that
    cannot complete fails on every rank within moments instead of after its timeout."""

    POLL_S = 0.02  # how often a polling wait asks ``abort``

    def __init__(self, step_s: float, total_s: float | None = None, abort=None):
        import time

        self._now = time.monotonic
        self.step_s = step_s
        self.end = None if total_s is None else self._now() + total_s
        self.abort = abort

    def check(self, stage: str = "transfer") -> None:
        """Raise Aborted if another member gave up (no-op without an ``abort`` callable)."""
        reason = self.abort() if self.abort is not None else None
        if reason:
            raise Aborted(reason, stage=stage)

    def left(self, what: str, stage: str = "transfer", who: str = "") -> float:
        if self.end is None:
            return self.step_s
        remaining = self.end - self._now()
        if remaining <= 0:
            raise SyncError(f"{what}: the push ran out of its time budget ({who})" if who else
                            f"{what}: the push ran out of its time budget", stage=stage, who=who)
        return min(self.step_s, remaining)


def describe(error: BaseException) -> str:
    """``"Type: message"``; for an error without a message (a bare ``assert`` in a loader, say), where it was raised
    and the line that raised it instead, so that whoever reads it remotely learns something."""
    text = str(error)
    if text:
        return f"{type(error).__name__}: {text}"
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    f = frames[-1]
    return f"{type(error).__name__} at {f.filename}:{f.lineno} in {f.name}: {f.line}"
