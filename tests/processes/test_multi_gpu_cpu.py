"""benchmarks/bench_multi_gpu.py's logic on CPU (gloo, tiny Qwen3-shaped model): the plain push leaves every
receiver holding exactly its tp shard, bit for bit, after several pushes with training in between. The GPU run of
the same script needs a multi-GPU machine."""

import pytest
import torch

from benchmarks import bench_multi_gpu as bench


def test_dry_run_plans_without_processes():
    out = bench.main(["--dry-run", "--gpus", "8", "--models", "qwen3_8b"])
    plan = out["models"]["qwen3_8b"]["plan"]
    assert plan["tensors"] == 399 and plan["full_bytes"] == 16_381_470_720
    assert plan["trainer_gpus"] == [0, 1, 2, 3] and plan["receiver_gpus"] == [4, 5, 6, 7]
    # tp 4: each receiver keeps a quarter of the model plus the replicated norms
    assert all(abs(b - 16_381_470_720 / 4) < 1e6 for b in plan["shard_bytes_per_receiver"])
    sim = plan["simulated"]
    assert sim["trainer_sync_tp_s"] < sim["trainer_sync_full_s"] < sim["checkpoint_engine_s"]


def test_verify_sink_catches_stale_weights():
    cfg = {"shape": "small", "tp": 2, "dtype": "float32"}
    dev = torch.device("cpu")
    sink = bench.make_sink(cfg, 1, dev)
    for name, shape in bench.tensor_shapes("small").items():
        sink[name].copy_(bench.shard_of(cfg, name, bench.expected(name, shape, torch.float32, dev, 3), 1))
    assert bench.verify_sink(cfg, 1, sink, dev, 3) == []
    assert len(bench.verify_sink(cfg, 1, sink, dev, 2)) == len(sink)  # one push behind: every tensor differs


@pytest.mark.slow
def test_fsdp2_trainers_plain_bit_exact():
    out = bench.main(["--device", "cpu", "--small", "--gpus", "4", "--iters", "1", "--methods", "plain,ce"])
    res = out["models"]["small"]
    assert "error" not in res["plain"], res["plain"]
    assert res["plain"]["bit_exact"], res["plain"]["mismatches"]
    assert res["ce"] == {"skipped": "needs CUDA"}



@pytest.mark.slow
def test_two_engine_replicas_one_plain_trainer():
    # 1 trainer rank (plain module), 4 receivers = 2 engine replicas of tp 2: receivers 0 and 2 keep the same shard
    out = bench.main(["--device", "cpu", "--small", "--gpus", "5", "--trainers", "1", "--tp", "2", "--no-fsdp",
                      "--iters", "1", "--methods", "plain"])
    res = out["models"]["small"]["plain"]
    assert "error" not in res, res
    assert res["bit_exact"] and len(res["bytes_per_receiver"]) == 4
