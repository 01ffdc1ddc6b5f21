"""engines/vllm/shards.py: the parts of each checkpoint tensor a TP worker holds, learned from the fast path's slots
(the loaders of tests/pure/test_placement.py), and which worker of an engine counts which part in the checksum."""
from __future__ import annotations

import torch

from tests.pure.test_placement import FusedQKV, random_weights

from trainer_sync.engines.vllm.placement import learn
from trainer_sync.engines.vllm.shards import held_pieces, owned_ranges, ranges_of, uncovered


def test_pieces_put_each_element_where_load_weights_puts_it():
    """Writing every piece from the flat checkpoint tensors gives the parameters load_weights gives, for a whole
    model and for each TP shard (half the columns: one piece per row)."""
    for tp_rank in (None, 0, 1):
        model, ref = FusedQKV(cols=8, tp_rank=tp_rank), FusedQKV(cols=8, tp_rank=tp_rank)
        w = random_weights(model.shapes())
        ref.load_weights(list(w.items()))
        slots, why = learn(model, model.shapes())
        assert why == ""
        held, why_not = held_pieces(slots, model.shapes())
        assert not why_not and "rotary.inv_freq" not in held  # a tensor the loader skips has no piece
        for name, pieces in held.items():
            flat = w[name].reshape(-1)
            for lo, v in pieces:
                v.copy_(flat[lo:lo + v.numel()])
        assert torch.equal(model.qkv, ref.qkv) and torch.equal(model.norm, ref.norm)
        if tp_rank is not None:
            assert len(held["q.weight"]) == 8  # a piece per row of q (8 rows of 4 of its 8 columns)
            assert ranges_of(held)["q.weight"] == [(r * 8 + tp_rank * 4, r * 8 + tp_rank * 4 + 4) for r in range(8)]


def test_every_element_is_counted_by_exactly_one_worker():
    """Two workers: a sharded tensor's parts are each one's own; a replicated one is counted by worker 0 only."""
    w0 = {"a": [(0, 4), (8, 12)], "norm": [(0, 6)]}
    w1 = {"a": [(4, 8), (12, 16)], "norm": [(0, 6)]}
    everyone = [w0, w1]
    assert owned_ranges(everyone, 0) == w0
    assert owned_ranges(everyone, 1) == {"a": [(4, 8), (12, 16)]}
    assert uncovered(everyone, {"a": 16, "norm": 6}) == []
    assert uncovered([w0, {"norm": [(0, 6)]}], {"a": 16, "norm": 6}) == ["a"]  # nobody holds half of a
    assert uncovered(everyone, {"a": 16, "norm": 6, "lm_head": 10}) == ["lm_head"]
