"""Process bodies for tests/processes/test_delta_adopt.py: a receiver that adopts delta targets at run time (as the
vLLM GPU backend does once its fast path is proven) and drops them again, and a trainer that waits, between pushes,
until that receiver has acted on the last one (as WeightSync waits for an engine's finish_weight_update)."""
from __future__ import annotations

from datetime import timedelta

from trainer_sync import Receiver

from .delta_roles import adamw_pushes, bf16_targets
from .roles import info, mlp, receive_pushes


def ready_key(push: int) -> str:
    return f"test/acted-on/{push}"


def waiting_trainer(rank, world, n, port, pushes, lr=1e-4):
    """AdamW steps on fp32 master weights, bf16 pushes; before push k+1 it waits until receiver 0 has acted on
    push k (adopted or dropped its targets). Returns the bf16 states and the reports."""
    def wait_for_receiver(sender, i):
        if i:
            sender.bridge.store.wait([ready_key(i)], timedelta(seconds=60))

    return adamw_pushes(mlp(), rank, n, port, pushes, lr, before_push=wait_for_receiver)


def adopting_receiver(j, n, m, port, actions):
    """``actions[k]``: what this receiver does after push k+1: "adopt" its served tensors as delta targets,
    "drop" them, or "" nothing. Its on_batch copies what it is handed into the served tensors (as an engine's
    loader would), unless it is handed the served tensors themselves. Returns per push: the version, the served
    tensors after it, and whether on_batch was handed the served tensors themselves."""
    served = bf16_targets()
    r = Receiver(info(port, j, n, m, timeout=60.0), adopts_targets=True)
    r.connect()
    out = []
    try:
        for k, action in enumerate(actions):
            handed = []

            def on_batch(batch):
                for name, t in batch:
                    handed.append(t.data_ptr() == served[name].data_ptr())
                    if not handed[-1]:
                        served[name].copy_(t)

            res = r.receive(on_batch)
            out.append((res.version, {name: t.clone() for name, t in served.items()}, all(handed)))
            if action == "adopt":
                assert r.adopt_targets(served)
            elif action == "drop":
                r.drop_targets("the engine re-processes a layer")
            r.bridge.store.set(ready_key(k + 1), "1")
    finally:
        r.close()
    return out


def mirror_receiver(j, n, m, port, pushes):
    """An ordinary receiver keeping a mirror: deltas whenever every receiver can take them."""
    return receive_pushes(Receiver(info(port, j, n, m, timeout=60.0)), pushes)
