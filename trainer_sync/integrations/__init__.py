"""Training-loop integrations: push after optimizer updates without touching the loop.

``attach(sync, target, every=k)`` picks the hook for ``target``:
  * a DeepSpeed engine (also what ``accelerator.prepare`` returns for a model under a DeepSpeed config):
    ``deepspeed.DeepSpeedHook``, after ``engine.step()`` at accumulation boundaries;
  * a torch optimizer or Accelerate's ``AcceleratedOptimizer``: ``accelerate.OptimizerHook``, the step post-hook.
``transformers.WeightSyncCallback`` is the ``TrainerCallback`` for HF / TRL trainers (``sync.callback(every=k)``).
The TensorBoard charts are ``trainer_sync.metrics.tensorboard``; ``accelerator=`` routes them into an Accelerate
TensorBoard tracker when the SyncConfig has no ``tb_dir``.
"""
from __future__ import annotations

from .base import ON_ERROR, PushFailed, PushHook, SyncWarning


def attach(sync, target, every: int = 1, *, on_error: str = "raise", start_step: int = 0,
           accelerator=None) -> PushHook:
    """Hook ``sync.push`` into the training loop behind ``target``; returns the hook (``.remove()`` undoes it)."""
    if accelerator is not None and getattr(sync, "metrics", None) is None:
        from ..metrics.tensorboard import SyncMetrics

        sync.metrics = SyncMetrics.from_accelerator(accelerator)
    from .deepspeed import DeepSpeedHook, is_deepspeed_engine

    if is_deepspeed_engine(target):
        if start_step:
            raise ValueError("trainer_sync: start_step does not apply to a DeepSpeed engine (it counts global_steps)")
        return DeepSpeedHook(sync, target, every, on_error)
    from .accelerate import OptimizerHook

    return OptimizerHook(sync, target, every, on_error, start_step)


__all__ = ["attach", "PushHook", "PushFailed", "SyncWarning", "ON_ERROR"]
