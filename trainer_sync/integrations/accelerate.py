"""Plain PyTorch and Accelerate: push after every k-th ``optimizer.step()`` through the optimizer's step post-hook.

    sync = WeightSync(model, engines=[llm], config=SyncConfig(tb_dir="runs/sync"))
    sync.attach(optimizer, every=1)          # a torch optimizer, or what accelerator.prepare returned
    ...
    loss.backward(); optimizer.step()        # the push runs inside step(), after the parameters changed

Which object is hooked: torch's ``Optimizer.register_step_post_hook`` on the optimizer that really updates the
parameters. For Accelerate's ``AcceleratedOptimizer`` that is the wrapped ``optimizer.optimizer``: the wrapper skips
``Optimizer.__init__`` (its own hooks would never run) and calls the inner ``step`` only when an update happens, so
  * gradient accumulation (``accelerator.accumulate``): micro-steps that do not sync gradients never call the inner
    step, so they are not counted and never push;
  * mixed precision with a GradScaler: a step skipped for inf/NaN gradients never calls the inner step either (the
    scaler decides the same on every rank: DDP gradients are identical, FSDP's scaler all-reduces found_inf).
``every`` counts real updates (plus ``start_step``, e.g. the global step of a resumed run); the version pushed is
that count, so the engines' weight version reads as "weights after update N".

DeepSpeed under Accelerate: the optimizer that ``prepare`` returns has a no-op step (DeepSpeed steps inside
``accelerator.backward``); attach the prepared model (the DeepSpeed engine) instead, see ``deepspeed.py``.
"""
from __future__ import annotations

import torch

from .base import PushHook


def _accelerate_wrapper_types():
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:
        return None, None
    try:
        from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper
    except ImportError:  # pragma: no cover - older accelerate
        DeepSpeedOptimizerWrapper = None
    return AcceleratedOptimizer, DeepSpeedOptimizerWrapper


def step_target(optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step`` runs exactly once per real update (see the module docstring)."""
    accelerated, ds_wrapper = _accelerate_wrapper_types()
    if ds_wrapper is not None and isinstance(optimizer, ds_wrapper):
        raise TypeError("trainer_sync: this is Accelerate's DeepSpeed optimizer wrapper, whose step() does nothing "
                        "(DeepSpeed steps inside accelerator.backward); attach the DeepSpeed engine instead: "
                        "sync.attach(model) with the model accelerator.prepare returned")
    inner = optimizer
    while accelerated is not None and isinstance(inner, accelerated):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"trainer_sync: cannot hook a {type(optimizer).__name__}: expected a torch.optim.Optimizer, "
                        f"an Accelerate-wrapped one, or a DeepSpeed engine")
    return inner


class OptimizerHook(PushHook):
    """Pushes from the step post-hook of ``optimizer`` (a torch optimizer or Accelerate's wrapper)."""

    def __init__(self, sync, optimizer, every: int = 1, on_error: str = "raise", start_step: int = 0):
        super().__init__(sync, every, on_error)
        self.optimizer = step_target(optimizer)
        self.step = int(start_step)  # global step of the weights the engines would get next
        self._handle = self.optimizer.register_step_post_hook(self._post_step)

    def _post_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        self.updated(self.step)

    def remove(self) -> None:
        super().remove()
        self._handle.remove()
