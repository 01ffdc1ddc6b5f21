"""Push-time simulator (benchmarks/simulate.py): invariants, calibration points, and agreement with the shards a
vLLM TP rank keeps (benchmarks/tp_shards.py)."""
import itertools
import math

import pytest

from benchmarks.simulate import (GB, KIMI_K2_FP8, QWEN3_8B, CeRates, Hardware, SyncRates, Workload, compare,
                                 pipeline_seconds, simulate_checkpoint_engine, simulate_trainer_sync)
from benchmarks.tp_shards import shard_numel

CONFIGS = [  # (num_gpus, tp, trainer_gpus): one node, colocated; one node, separate; several nodes, both
    (4, 4, 4), (2, 2, 2), (4, 2, 0), (8, 8, 0), (16, 16, 0), (64, 8, 16), (256, 16, 0), (256, 16, 64)]
HARDWARE = [Hardware(), Hardware(stream_cap_GBps=50.0), Hardware(link_efficiency=0.7, gpus_per_node=4)]


def workloads(model_bytes):
    for n, tp, m in CONFIGS:
        yield Workload(model_bytes, n, tp, m, replicated_bytes=model_bytes * 0.01, kv_bytes=model_bytes * 0.05,
                       num_kv_heads=4, num_tensors=500)


@pytest.mark.parametrize("hw", HARDWARE)
def test_monotone_in_bytes(hw):
    sizes = [1e8, 1e9, 1.6e10, 6.5e10, 1e12]
    for cfg in range(len(CONFIGS)):
        for tp_aware, overlap in itertools.product((True, False), repeat=2):
            t = [list(workloads(b))[cfg] for b in sizes]
            ours = [simulate_trainer_sync(w, hw, tp_aware=tp_aware, overlap=overlap).seconds for w in t]
            assert ours == sorted(ours), (CONFIGS[cfg], tp_aware, overlap, ours)
        ce = [simulate_checkpoint_engine(list(workloads(b))[cfg], hw).seconds for b in sizes]
        assert ce == sorted(ce), (CONFIGS[cfg], ce)


@pytest.mark.parametrize("hw", HARDWARE)
def test_overlap_never_slower_than_serial_and_tp_aware_never_more(hw):
    for w in workloads(3.3e10):
        for bucket in (1 * 2**20, 64 * 2**20, 256 * 2**20, 2**34):
            w2 = Workload(**{**w.__dict__, "bucket_bytes": bucket})
            for tp_aware in (True, False):
                over = simulate_trainer_sync(w2, hw, tp_aware=tp_aware, overlap=True)
                serial = simulate_trainer_sync(w2, hw, tp_aware=tp_aware, overlap=False)
                assert over.seconds <= serial.seconds + 1e-12
            aware = simulate_trainer_sync(w2, hw, tp_aware=True)
            full = simulate_trainer_sync(w2, hw, tp_aware=False)
            assert aware.bytes_per_gpu <= full.bytes_per_gpu
            assert w2.tp_total_bytes() >= w2.model_bytes - 1e-3  # every element goes to some group
            # Time: never slower when nothing is replicated (the trainer sends the same bytes, receivers fewer).
            # With replication a trainer rank sends replicated bytes once per tp group, so with one trainer rank
            # or tiny buckets TP-aware can lose -- a real effect of one broadcast per tp group (RESULTS.md).
            plain = Workload(**{**w2.__dict__, "replicated_bytes": 0.0, "kv_bytes": 0.0})
            assert simulate_trainer_sync(plain, hw, tp_aware=True).seconds <= \
                simulate_trainer_sync(plain, hw, tp_aware=False).seconds + 1e-12


def test_replication_costs_the_sender():
    """One trainer rank and heavy GQA replication: the sender's bytes grow with tp (documented, not hidden)."""
    w = Workload(1e10, num_gpus=8, tp=8, trainer_gpus=0, kv_bytes=2e9, num_kv_heads=1)
    assert w.tp_total_bytes() == pytest.approx(8e9 + 8 * 2e9)
    assert w.bytes_per_tp_rank() == pytest.approx(1e9 + 2e9)


def test_reduces_to_bytes_over_bandwidth_for_one_bucket():
    fast = SyncRates(pack_GBps=1e12, reload_GBps=1e12, bucket_overhead_s=0.0)
    for b in (1e6, 1e9, 1.6e10):
        w = Workload(b, num_gpus=1, tp=1, trainer_gpus=1, bucket_bytes=2 * b)
        est = simulate_trainer_sync(w, Hardware(), fast)
        assert est.steps == 1
        assert est.seconds == pytest.approx(b / (450 * GB), rel=1e-6)
        # with the stages' own rates the single bucket pays pack + transfer + reload one after another
        est = simulate_trainer_sync(w, Hardware(), SyncRates(bucket_overhead_s=0.0))
        assert est.seconds == pytest.approx(b / (2155 * GB) + b / (450 * GB) + b / (2155 * GB), rel=1e-6)


def test_pipeline_formula():
    assert pipeline_seconds([1.0, 2.0, 3.0], 1) == 6.0
    assert pipeline_seconds([1.0, 2.0, 3.0], 3) == pytest.approx(2.0 + 2 / 3 * 3.0)
    assert pipeline_seconds([1.0, 2.0, 3.0], 10**9) == pytest.approx(3.0)
    assert pipeline_seconds([1.0, 2.0, 3.0], 7, overlap=False) == 6.0


def test_closed_form_bytes_match_the_engine_shards():
    """Workload.bytes_per_tp_rank (assumption 1) equals the bytes of the shards a vLLM TP rank keeps (tp_shards)."""
    shapes = {"model.embed_tokens.weight": (151936, 4096), "model.norm.weight": (4096,),
              "lm_head.weight": (151936, 4096)}
    for i in range(36):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (4096, 4096), p + "self_attn.k_proj.weight": (1024, 4096),
                       p + "self_attn.v_proj.weight": (1024, 4096), p + "self_attn.o_proj.weight": (4096, 4096),
                       p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                       p + "mlp.gate_proj.weight": (12288, 4096), p + "mlp.up_proj.weight": (12288, 4096),
                       p + "mlp.down_proj.weight": (4096, 12288), p + "input_layernorm.weight": (4096,),
                       p + "post_attention_layernorm.weight": (4096,)})
    assert len(shapes) == 399
    for tp in (1, 2, 4, 8, 16):
        w = Workload(num_gpus=tp, tp=tp, **QWEN3_8B)
        assert sum(math.prod(s) for s in shapes.values()) * 2 == w.model_bytes == 16_381_470_720
        for t in range(tp):
            nbytes = sum(shard_numel(n, s, 32, 8, tp, t) for n, s in shapes.items()) * 2
            assert nbytes == pytest.approx(w.bytes_per_tp_rank(), rel=1e-9), (tp, t)


def test_calibration_points():
    # checkpoint-engine colocated on one H200 (the measurement the CE reload rate is derived from): 1.00 s
    ce = simulate_checkpoint_engine(Workload(num_gpus=1, **QWEN3_8B), Hardware(), CeRates(bucket_bytes=1e12))
    assert ce.seconds == pytest.approx(1.00, abs=0.01)
    # its published 256-GPU figure (21.5 s for Kimi-K2 FP8, TP16) is reproduced with one NIC's rate per broadcast
    # stream -- and NOT with the node-aggregate assumption (which gives a few seconds)
    w = Workload(num_gpus=256, tp=16, **KIMI_K2_FP8)
    capped = simulate_checkpoint_engine(w, Hardware(stream_cap_GBps=50.0))
    assert 16 <= capped.seconds <= 23 and capped.bottleneck == "broadcast"
    assert simulate_checkpoint_engine(w, Hardware()).seconds < 5
    # trainer_sync's estimate does not depend on that cap: many streams share the NICs; TP-aware bytes are 1/16
    ours = [simulate_trainer_sync(w, hw) for hw in (Hardware(), Hardware(stream_cap_GBps=50.0))]
    assert ours[0].seconds == pytest.approx(ours[1].seconds)
    assert ours[0].bytes_per_gpu == pytest.approx(1e12 / 16 + 1.1e9 * 15 / 16)
    assert 1.0 < ours[0].seconds < 1.5
    assert compare(w, Hardware(stream_cap_GBps=50.0))["speedup_vs_checkpoint_engine"] > 10


def test_bad_workloads_refused():
    with pytest.raises(ValueError):
        Workload(1e9, num_gpus=6, tp=4)
    with pytest.raises(ValueError):
        Workload(1e9, num_gpus=4, tp=4, replicated_bytes=2e9)
