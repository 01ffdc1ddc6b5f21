"""What every training-loop hook shares: push every k-th update, the version/step numbering, the error policy.

A hook turns "an optimizer update happened at global step s" into ``sync.push(version=s)`` when s is due. Every
trainer rank runs the same hook at the same update (data-parallel ranks step together), so every rank enters
``WeightSync.push`` together, which is what its collectives need. WeightSync makes all ranks agree on the outcome
(they return the same version or raise the same error), so the error policy below takes the same branch on every
rank and no rank is left waiting for another.

Error policy ``on_error``:
  ``"raise"`` (default): the push's exception leaves the training loop's ``optimizer.step()`` / ``engine.step()`` /
      ``trainer.train()`` as a ``PushFailed`` (a SyncError) naming the step, the engine and the stage.
  ``"warn"``: the same message as a ``SyncWarning``; training continues, the failure is counted in ``hook.errors``
      (and ``sync/errors`` in TensorBoard), and the next due push retries (WeightSync rebuilds the bridging group
      first; an engine whose update broke half-way stays paused until a push succeeds).
"""
from __future__ import annotations

import warnings

from ..errors import SyncError
from ..protocol.report import SyncReport

ON_ERROR = ("raise", "warn")


class SyncWarning(UserWarning):
    """A push failed and the hook's policy is ``on_error="warn"``: training goes on with the engines' old weights."""


class PushFailed(SyncError):
    """A push a training-loop hook made failed. ``step``, ``stage`` and ``who`` (the engine) say where."""

    def __init__(self, step: int, error: BaseException):
        stage = getattr(error, "stage", "") or "unknown stage"
        who = getattr(error, "who", "") or "unknown engine"
        super().__init__(f"trainer_sync: push after step {step} failed at stage '{stage}' ({who}): "
                         f"{type(error).__name__}: {error}", stage=getattr(error, "stage", ""),
                         who=getattr(error, "who", ""))
        self.step = step
        self.error = error


class PushHook:
    """Counts updates and pushes when due. Subclasses connect ``updated(step)`` to a training loop.

    Attributes for checks and logs: ``updates`` (updates seen), ``pushes`` (successful pushes), ``versions``
    (the version of each successful push, in order), ``last_report``, ``errors`` (PushFailed, warn policy).
    """

    def __init__(self, sync, every: int = 1, on_error: str = "raise"):
        if int(every) < 1:
            raise ValueError(f"trainer_sync: every must be >= 1, got {every}")
        if on_error not in ON_ERROR:
            raise ValueError(f"trainer_sync: on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.sync = sync
        self.every = int(every)
        self.on_error = on_error
        self.updates = 0
        self.pushes = 0
        self.versions: list[int] = []
        self.last_report: SyncReport | None = None
        self.errors: list[PushFailed] = []
        self.removed = False

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def updated(self, step: int) -> SyncReport | None:
        """An update finished and the weights are those of global ``step``: push if due."""
        self.updates += 1
        if self.removed or not self.due(step):
            return None
        return self.push(step)

    def push(self, step: int) -> SyncReport | None:
        """Push now as version ``step`` (the last version + 1 if ``step`` is not newer, e.g. after a manual push)."""
        last = getattr(getattr(self.sync, "sender", None), "version", 0)
        version = step if step > last else None
        try:
            report = self.sync.push(version)
        except Exception as e:  # every rank gets the same verdict from WeightSync
            failure = PushFailed(step, e)
            if self.on_error == "raise":
                raise failure from e
            self.errors.append(failure)
            metrics = getattr(self.sync, "metrics", None)
            if metrics is not None:
                metrics.log_error(step)
            warnings.warn(str(failure), SyncWarning, stacklevel=2)
            return None
        self.pushes += 1
        self.versions.append(report.version)
        self.last_report = report
        return report

    def remove(self) -> None:
        """Stop pushing (and unhook from the training loop where the subclass hooked in)."""
        self.removed = True
