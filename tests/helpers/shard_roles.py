"""Process bodies for tests/processes/test_delta_shards.py: two receivers that are the TP workers of one engine, each
serving only its shard of every tensor of tests.helpers.roles.mlp (rows of the first layer, columns of the others,
the biases of the last two replicated), as a vLLM TP engine's parameters are. They adopt their shards as delta
destinations the way the vLLM backend does (engines/vllm/shards.py: pieces from the fast path's slots, the engine's
ranges through the store, the checksum checked by both together)."""
from __future__ import annotations

from datetime import timedelta

import torch

from trainer_sync import Receiver
from trainer_sync.engines.vllm.placement import Slot
from trainer_sync.engines.vllm.shards import engine_shards, held_pieces
from trainer_sync.protocol.messages import Keys

from .adopt_roles import ready_key
from .roles import info, mlp

BF16 = torch.bfloat16
WORKERS = 2


def shard_slots(j: int) -> dict[str, list[Slot]]:
    """Worker ``j``'s places: a parameter of its shard's shape per tensor, and where it comes from in the tensor."""
    slots = {}
    for name, p in mlp().named_parameters():
        shape = tuple(p.shape)
        if name == "0.weight" or name == "0.bias":  # column-parallel: a block of rows (one run)
            rows = shape[0] // WORKERS
            size, offset = (rows, *shape[1:]), j * rows * (shape[1] if len(shape) > 1 else 1)
        elif name.endswith(".weight"):  # row-parallel: a block of columns (one run per row)
            cols = shape[1] // WORKERS
            size, offset = (shape[0], cols), j * cols
        else:  # replicated: the whole tensor on every worker
            size, offset = shape, 0
        stride = torch.empty(shape, device="meta").stride()
        slots[name] = [Slot(name, torch.zeros(size, dtype=BF16), size, stride, offset)]
    return slots


def acted_key(push: int, j: int) -> str:
    return f"test/shards-acted/{push}/{j}"


def shard_worker(j, n, m, port, pushes, tamper_after=None):
    """Worker ``j`` of the engine (receiver ``j``): takes ``pushes`` pushes, its on_batch copying its shard out of
    each whole tensor handed to it (as vLLM's loader narrows), and adopts its shards after the first push. Worker 0
    tells the trainer (adopt_roles.ready_key) once both acted. ``tamper_after``: after that push, change one of its
    served elements behind the trainer's back. Returns per push: the version and the served shards."""
    slots = shard_slots(j)
    shapes = {name: (tuple(p.shape), BF16) for name, p in mlp().named_parameters()}
    r = Receiver(info(port, j, n, m, timeout=60.0), adopts_targets=True)
    r.connect()
    shards, plan, out = None, None, []

    def on_plan(p):
        nonlocal plan
        plan = p

    def on_batch(batch):
        for name, t in batch:
            if t is not None:  # None: written in place by the receiver already (the shards)
                s = slots[name][0]
                s.dst.copy_(s.source(t))

    try:
        for k in range(pushes):
            if shards is not None:
                shards.combine.begin(Keys.push(r.seq))
            res = r.receive(on_batch, on_plan=on_plan)
            out.append((res.version, {name: s[0].dst.clone() for name, s in slots.items()}))
            if k == 0:
                held, why_not = held_pieces(slots, shapes)
                assert not why_not, why_not
                store = r.bridge.store
                got, why = engine_shards(held, plan, store, 0, WORKERS, j, 60.0)
                if got is None:  # the other worker had not told its ranges yet: it has now
                    store.wait([Keys.shard_ranges(1 - j)], timedelta(seconds=60))
                    got, why = engine_shards(held, plan, store, 0, WORKERS, j, 60.0)
                assert got is not None, why
                shards = got
                assert r.adopt_targets(shards)
            if tamper_after == k + 1:
                slots["2.weight"][0].dst[0, 0] += 1
            r.bridge.store.set(acted_key(k + 1, j), "1")
            if j == 0:
                r.bridge.store.wait([acted_key(k + 1, i) for i in range(WORKERS)], timedelta(seconds=60))
                r.bridge.store.set(ready_key(k + 1), "1")
    finally:
        r.close()
    return out
