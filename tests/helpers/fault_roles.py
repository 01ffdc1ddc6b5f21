"""Process bodies for the engine-level fault tests (tests/vllm/test_vllm_faults.py): trainers that push into a real
``vllm serve`` and die for real (importable by spawned children)."""
from __future__ import annotations

import json
import os
import signal
import time

import torch


class KillOnFlat:
    """Wraps a trainer's source: the process SIGKILLs itself when packing its ``n``-th tensor, after writing the
    time it died to ``stamp`` (so the test can time the engine's abort from the moment the trainer was gone)."""

    def __init__(self, inner, n: int, stamp: str):
        self.inner, self.n, self.stamp, self.calls = inner, n, stamp, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def flat(self, name):
        self.calls += 1
        if self.calls == self.n:
            with open(self.stamp, "w") as f:
                json.dump({"killed_at": time.time(), "tensor": name}, f)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.flat(name)


def dying_trainer(rank, world, url: str, timeout_s: float, kill_at: int, stamp: str, seeds: tuple[int, int]):
    """Push version 1 whole, take a step, then die while packing the ``kill_at``-th tensor of version 2."""
    from .models import build_model, perturb

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0)
    perturb(model, seed=seeds[0])
    # Small buckets: the engine receives and applies the first tensors of version 2 before the trainer dies.
    sync = WeightSync(model, [url], SyncConfig(timeout_s=timeout_s, bucket_mb=0.004))
    sync.push(version=1)
    perturb(model, seed=seeds[1])
    sync.sender.source = KillOnFlat(sync.sender.source, kill_at, stamp)
    sync.push(version=2)
    return "unreachable"


def fresh_trainer(rank, world, url: str, timeout_s: float, seed: int, version: int) -> dict:
    """A new trainer process (a restarted job): one complete push of its weights as ``version``."""
    from .models import build_model, perturb

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0)
    perturb(model, seed=seed)
    with WeightSync(model, [url], SyncConfig(timeout_s=timeout_s)) as sync:
        report = sync.push(version=version)
        versions = sync.weight_versions()
    return {"report": report.to_dict(), "versions": versions,
            "state": {n: p.detach().clone() for n, p in model.named_parameters()}}


def model_from_state(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from .models import build_model

    model = build_model(seed=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model
