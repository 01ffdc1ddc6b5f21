"""Planner unit tests: pure functions, no processes."""
import math

import pytest

from trainer_sync.plan.buckets import ALIGN, BucketPlan, LocalPiece, PlanError, fit_budget, plan_buckets, merge_pieces
from trainer_sync.plan.handshake import check_plan, resolve_wire_dtypes
from trainer_sync.protocol.messages import Expected


def full(name, shape, dtype="float32", ranks=(0,)):
    n = math.prod(shape)
    return [LocalPiece(name, tuple(shape), dtype, 0, n, r) for r in ranks]


def sharded(name, shape, world, dtype="float32"):
    """dim-0 shards as torch.chunk / fully_shard make them."""
    rows, per_row = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world)
    out = []
    for r in range(world):
        lo, hi = min(r * chunk, rows), min((r + 1) * chunk, rows)
        out.append(LocalPiece(name, tuple(shape), dtype, lo * per_row, (hi - lo) * per_row, r))
    return out


def covered(plan: BucketPlan):
    """name -> sorted list of (start, numel) over all slots: must tile each tensor exactly once."""
    seen = {}
    for b in plan.buckets:
        for s in b.slots:
            seen.setdefault(s.name, []).append((s.start, s.numel))
    return {n: sorted(v) for n, v in seen.items()}


def assert_tiles(plan):
    for name, ranges in covered(plan).items():
        cursor = 0
        for start, numel in ranges:
            assert start == cursor, (name, ranges)
            cursor += numel
        assert cursor == plan.tensors[name].numel, name


def test_offsets_aligned_and_within_bucket():
    pieces = full("a", (3, 5)) + full("b", (7,), "bfloat16") + full("c", (100, 100)) + full("d", (1,), "int64")
    plan = plan_buckets(pieces, 1, bucket_bytes=4096)
    for b in plan.buckets:
        assert all(s.offset % ALIGN == 0 for s in b.slots)
        assert b.nbytes <= 4096 or len(b.slots) == 1
    assert_tiles(plan)
    # no two slots in one bucket overlap
    for b in plan.buckets:
        spans = sorted((s.offset, s.offset + s.numel * 4) for s in b.slots)
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))


def test_oversized_tensor_gets_own_bucket():
    pieces = full("small1", (10,)) + full("big", (1000,)) + full("small2", (10,))
    plan = plan_buckets(pieces, 1, bucket_bytes=1024)
    big = [b for b in plan.buckets if any(s.name == "big" for s in b.slots)]
    assert len(big) == 1 and len(big[0].slots) == 1 and big[0].nbytes == 4000
    assert [s.name for b in plan.buckets for s in b.slots] == ["small1", "big", "small2"]


def test_empty_tensor_and_odd_sizes_and_dtypes():
    pieces = (full("empty", (0, 4)) + full("odd", (3, 7), "float16") + full("ints", (5,), "int32")
              + full("bf", (13,), "bfloat16") + full("u8", (1,), "uint8"))
    plan = plan_buckets(pieces, 1, bucket_bytes=1 << 20)
    assert set(plan.tensors) == {"empty", "odd", "ints", "bf", "u8"}
    assert any(s.name == "empty" and s.numel == 0 for b in plan.buckets for s in b.slots)
    assert plan.tensors["odd"].dtype == "float16"
    assert_tiles(plan)


def test_replicated_tensors_spread_over_ranks_by_bytes():
    pieces = []
    for i in range(8):
        pieces += full(f"w{i}", (256,), ranks=(0, 1))
    plan = plan_buckets(pieces, 2, bucket_bytes=2048)
    per_rank = [sum(b.nbytes for b in plan.buckets if b.src == r) for r in (0, 1)]
    assert per_rank[0] == per_rank[1] == 4 * 1024
    assert_tiles(plan)
    # every tensor is sent by exactly one rank
    assert sum(len(b.slots) for b in plan.buckets) == 8


def test_fsdp_shards_keep_their_owner_and_rounds_line_up():
    pieces = sharded("w", (10, 3), 2) + sharded("v", (5,), 2) + sharded("u", (1, 4), 2)
    plan = plan_buckets(pieces, 2, bucket_bytes=1 << 20)
    assert_tiles(plan)
    srcs = {(s.name, s.start): b.src for b in plan.buckets for s in b.slots}
    assert srcs[("w", 0)] == 0 and srcs[("w", 15)] == 1
    assert [len(r) for r in plan.rounds()] == [2]


def test_hsdp_duplicate_shards_are_sent_once():
    pieces = sharded("w", (8, 2), 2) + [LocalPiece(p.name, p.shape, p.dtype, p.start, p.numel, p.rank + 2)
                                          for p in sharded("w", (8, 2), 2)]
    plan = plan_buckets(pieces, 4, bucket_bytes=1 << 20)
    assert_tiles(plan)
    assert sum(len(b.slots) for b in plan.buckets) == 2


def test_gap_in_shards_is_an_error_naming_the_tensor():
    pieces = [LocalPiece("w", (10,), "float32", 0, 4, 0), LocalPiece("w", (10,), "float32", 6, 4, 1)]
    with pytest.raises(PlanError, match=r"w: elements \[4, 6\)"):
        plan_buckets(pieces, 2, 1024)


def test_ranks_disagreeing_on_shape_is_an_error():
    with pytest.raises(PlanError, match="w: trainer rank 1"):
        merge_pieces(full("w", (4,)) + [LocalPiece("w", (5,), "float32", 0, 5, 1)])


def test_plan_json_round_trip():
    pieces = sharded("w", (10, 3), 2) + full("b", (7,), "bfloat16", ranks=(0, 1))
    plan = plan_buckets(pieces, 2, 64, aliases={"w": ("lm_head.weight",)})
    again = BucketPlan.from_json(plan.to_json())
    assert again == plan


def test_check_plan_lists_every_mismatch():
    plan = plan_buckets(full("a", (2, 3)) + full("b", (4,)) + full("extra", (1,)), 1, 1024,
                        aliases={"a": ("tied",)})
    exp = Expected({"a": ((2, 3), "float32"), "tied": ((2, 3), None), "b": ((5,), "float32"),
                    "missing": ((1,), "float32")})
    errs = check_plan(plan, exp, "receiver 0")
    assert any("missing missing" in e for e in errs)
    assert any("unexpected extra" in e for e in errs)
    assert any("wrong shape for b" in e for e in errs)
    assert len(errs) == 3 and all(e.startswith("receiver 0:") for e in errs)
    errs = check_plan(plan_buckets(full("a", (2, 3), "int64"), 1, 64), Expected({"a": ((2, 3), "float32")}), "r1")
    assert errs == ["r1: wrong dtype for a: sent int64, expected float32"]


def test_an_expected_with_model_facts_only_checks_no_names():
    """An MoE engine on dummy weights (no safetensors checkpoint) states its routing but no tensors: the plan's
    names and shapes go unchecked (as with no Expected), not every tensor "unexpected"."""
    plan = plan_buckets(full("a", (2, 3)) + full("b", (4,)), 1, 1024)
    assert check_plan(plan, Expected({}, model={"num_experts_per_tok": 8}), "receiver 0") == []


def test_wire_dtype_resolution():
    meta, _ = merge_pieces(full("w", (2,), "float32") + full("i", (2,), "int64"))
    exp = [Expected({"w": ((2,), "bfloat16"), "i": ((2,), "int64")})]
    assert resolve_wire_dtypes(meta, "auto", exp) == {"w": "bfloat16", "i": "int64"}
    assert resolve_wire_dtypes(meta, "model", exp) == {"w": "float32", "i": "int64"}
    assert resolve_wire_dtypes(meta, "float16", exp) == {"w": "float16", "i": "int64"}
    assert resolve_wire_dtypes(meta, "auto", []) == {"w": "float32", "i": "int64"}


def test_fit_budget():
    assert fit_budget(1024, 2, 100, None).fallback is None
    assert fit_budget(1024, 2, 100, 4096).fallback is None
    f = fit_budget(1024, 2, 100, 1024)
    assert f.bucket_bytes == 512 and f.num_buffers == 2 and "shrunk" in f.fallback
    f = fit_budget(1024, 2, 600, 1000)
    assert f.num_buffers == 1 and "one buffer" in f.fallback
    f = fit_budget(1024, 2, 100, 2048, buffers_per_stage=2)
    assert f.bucket_bytes == 512
    with pytest.raises(PlanError, match="smaller than the largest"):
        fit_budget(1024, 2, 5000, 4096)
