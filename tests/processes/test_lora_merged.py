"""Merged LoRA pushes from sharded trainers (issue 27): a 2-rank FSDP2 (each rank merges its own rows from its shards
and the gathered lora_A) and a 2-rank ZeRO-3 trainer (gathered per round) send ``base + scaling * B @ A`` to a plain
receiver: the whole model on the first push, then the adapted modules only, each equal to HF's merge_and_unload."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from tests.helpers import roles
from tests.helpers.cluster import free_port, run_roles
from tests.helpers.lora_roles import sharded_merged_sender

PUSHES = 3


@pytest.mark.parametrize("kind", ["fsdp2", "zero3"])
def test_sharded_trainer_sends_merged_weights(kind):
    port = free_port()
    out = run_roles([("trainer", r, 2, sharded_merged_sender, (port, kind, PUSHES)) for r in range(2)]
                    + [("receiver", 0, 1, roles.collect_receiver, (2, port, PUSHES, None, "tok", 90.0))],
                    timeout=300)
    rank0 = out[("trainer", 0)]
    received = out[("receiver", 0)]
    assert [r["lora"] for r in rank0["reports"]] == ["merged", "merged-partial", "merged-partial"]
    assert [r["lora"] for r in out[("trainer", 1)]["reports"]] == [r["lora"] for r in rank0["reports"]]
    for i, ((_, got), ref) in enumerate(zip(received, rank0["refs"])):
        names = set(got)
        if i == 0:  # the whole model (the tied LM head rides along with the embedding)
            assert set(ref) - {"lm_head.weight"} <= names <= set(ref)
        else:  # only the seven adapted linear kinds, never the embedding or a norm
            assert names and all(n.endswith("_proj.weight") for n in names)
            assert len(names) == 14
        for n, t in got.items():
            assert torch.allclose(t, ref[n], rtol=0, atol=1e-6), (i, n)
