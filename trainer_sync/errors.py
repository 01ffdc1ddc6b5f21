"""Errors a sync can end in. Each names who (rank, receiver, engine) and at which stage it failed."""
from __future__ import annotations


class SyncError(RuntimeError):
    """A push or receive failed. ``stage`` is one of rendezvous, handshake, transfer, apply, finish; ``who`` names the
    peer at fault (``"receiver 1"``, ``"trainer rank 0"``, ``"engine http://host:8000"``) where it is known."""

    def __init__(self, message: str, stage: str = "", who: str = ""):
        super().__init__(message)
        self.stage = stage
        self.who = who


class RendezvousRefused(SyncError, PermissionError):
    """A peer presented the wrong token (or none) and was not let into the group."""


class EngineHeld(SyncError):
    """An engine refused a join because another trainer holds it and is still alive (see engines/vllm.py)."""


# An engine's update_weights error ends with this when no worker of the engine had applied any weight of the push:
# the engine still serves its old weights whole, so the trainer resumes it instead of leaving it paused.
UNTOUCHED = "[trainer_sync: no weight was applied, the engine serves its old weights]"


class HandshakeMismatch(SyncError, ValueError):
    """The trainer's tensors do not match what a receiver expects; nothing was sent."""

    def __init__(self, mismatches: list[str]):
        super().__init__("trainer_sync handshake failed, nothing was sent:\n  " + "\n  ".join(mismatches),
                         stage="handshake")
        self.mismatches = list(mismatches)


class Deadline:
    """Time left for one wait: the smaller of the per-wait cap and what remains of the whole operation."""

    def __init__(self, step_s: float, total_s: float | None = None):
        import time

        self._now = time.monotonic
        self.step_s = step_s
        self.end = None if total_s is None else self._now() + total_s

    def left(self, what: str, stage: str = "transfer", who: str = "") -> float:
        if self.end is None:
            return self.step_s
        remaining = self.end - self._now()
        if remaining <= 0:
            raise SyncError(f"{what}: the push ran out of its time budget ({who})" if who else
                            f"{what}: the push ran out of its time budget", stage=stage, who=who)
        return min(self.step_s, remaining)
