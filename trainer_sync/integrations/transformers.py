"""transformers.Trainer and the TRL trainers built on it (GRPOTrainer, PPO-style trainers): a TrainerCallback.

    sync = WeightSync(model, engines=["http://rollout-host:8000"])
    trainer = GRPOTrainer(model=model, ..., callbacks=[sync.callback(every=1)])
    trainer.train()

``on_step_end`` runs on every process after each optimizer update (after gradient accumulation, after DeepSpeed's
engine step), with ``state.global_step`` already advanced: the callback pushes when ``global_step % every == 0``,
as version ``global_step``, so the engines' weight version is the Trainer's step. Build the WeightSync on the model
the Trainer trains, after it was wrapped if the wrapping replaces parameters (FSDP2 shards in place, so before or
after ``trainer.train()`` begins both work for ``fully_shard``).

Under Accelerate's FSDP2 or DeepSpeed ZeRO-3 configs the Trainer shards or partitions the model inside
``trainer.train()``, after the callbacks were made, so a WeightSync built beforehand would see the unsharded
parameters. ``WeightSyncCallback.lazy(build)`` builds it in ``on_train_begin`` instead, from the model the Trainer
trains (already sharded / partitioned), on every process together:

    cb = WeightSyncCallback.lazy(lambda model: WeightSync(model, engines if rank == 0 else None), every=1)
    trainer = GRPOTrainer(model=model, ..., callbacks=[cb]); trainer.train(); cb.sync.close()
"""
from __future__ import annotations

from transformers import TrainerCallback

from .base import PushHook


class WeightSyncCallback(TrainerCallback):
    def __init__(self, sync, every: int = 1, on_error: str = "raise"):
        self.hook = PushHook(sync, every, on_error)
        self.build = None

    @classmethod
    def lazy(cls, build, every: int = 1, on_error: str = "raise") -> "WeightSyncCallback":
        """A callback whose WeightSync is ``build(model)``, called in ``on_train_begin`` on every process with the
        model the Trainer trains, after FSDP2 sharded it or ZeRO-3 partitioned it (see the module docstring)."""
        cb = cls(None, every, on_error)
        cb.build = build
        return cb

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.hook.sync is None and self.build is not None:
            self.hook.sync = self.build(model)
        return control

    @property
    def sync(self):
        return self.hook.sync

    def on_step_end(self, args, state, control, **kwargs):
        self.hook.updated(int(state.global_step))
        return control

    # Counters for checks and logs (see PushHook).
    @property
    def pushes(self) -> int:
        return self.hook.pushes

    @property
    def versions(self) -> list[int]:
        return self.hook.versions

    @property
    def errors(self):
        return self.hook.errors
