"""DeepSpeed: push after ``engine.step()`` at a gradient-accumulation boundary whose update was applied.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    sync = WeightSync(engine, engines=[llm])
    sync.attach(engine, every=1)
    ...
    engine.backward(loss); engine.step()     # pushes after the boundary step's update, on every rank together

Why here and not on the optimizer: ZeRO's optimizer is not a torch optimizer (no step hooks), and the torch optimizer
inside it updates fp32 master partitions *before* ZeRO copies them into the model's parameters, so a hook there
would push stale weights. DeepSpeed's engine has no step hook of its own, so this wraps ``step`` on the engine
*instance* (the class is untouched; ``hook.remove()`` restores it). Accelerate's ``accelerator.backward`` calls
``engine.step()`` through the instance too, so the same hook serves ``accelerate launch`` with a DeepSpeed config.

A step counts when ``engine.is_gradient_accumulation_boundary()`` held as it began and ``engine.was_step_applied()``
after it (an fp16 overflow skips the update on every rank alike). The version pushed is ``engine.global_steps``.
"""
from __future__ import annotations

import sys

from .base import PushHook


def is_deepspeed_engine(obj) -> bool:
    # Without deepspeed imported there can be no engine; importing it just to check is slow and noisy.
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return engine_cls is not None and isinstance(obj, engine_cls)


class DeepSpeedHook(PushHook):
    def __init__(self, sync, engine, every: int = 1, on_error: str = "raise"):
        super().__init__(sync, every, on_error)
        if not (hasattr(engine, "is_gradient_accumulation_boundary") and hasattr(engine, "was_step_applied")):
            raise TypeError(f"trainer_sync: {type(engine).__name__} is not a DeepSpeed engine")
        self.engine = engine
        self.boundaries = 0  # boundary steps seen, applied or not
        original = engine.step

        def step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            out = original(*args, **kwargs)
            if boundary:
                self.boundaries += 1
                if engine.was_step_applied():
                    self.updated(int(engine.global_steps))
            return out

        step.__wrapped__ = original
        engine.step = step

    def remove(self) -> None:
        super().remove()
        if "step" in vars(self.engine):
            del self.engine.step  # back to the class's method
