"""Multi-GPU pushes over NCCL (issue 9): FSDP2 trainer ranks on some GPUs, receivers on the others, bit for bit.

Runs benchmarks/bench_multi_gpu.py's roles: the plain push (Sender/Receiver, backend nccl, every trainer rank sends
its own FSDP2 shard); every receiver's tp shard is compared with the trainer's weights after each run's last push.
Needs >= 2 CUDA GPUs (skipped otherwise); the same logic runs on CPU in test_multi_gpu_cpu.py.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs >= 2 CUDA GPUs (a multi-GPU machine kind)")]



def _gpus():
    return 4 if torch.cuda.device_count() >= 4 else 2


def _check(res, methods):
    for method in methods:
        assert "error" not in res[method], res[method]
        assert res[method]["bit_exact"], res[method]["mismatches"]


def test_nccl_fsdp2_small_plain_bit_exact():
    from benchmarks import bench_multi_gpu as bench

    out = bench.main(["--device", "cuda", "--small", "--gpus", str(_gpus()), "--iters", "2",
                      "--methods", "plain"])
    _check(out["models"]["small"], ("plain",))


@pytest.mark.skipif(torch.cuda.device_count() < 5, reason="needs >= 5 GPUs for two engine replicas")
def test_nccl_engine_replicas():
    from benchmarks import bench_multi_gpu as bench

    out = bench.main(["--device", "cuda", "--small", "--gpus", "5", "--trainers", "1", "--tp", "2", "--iters", "2",
                      "--methods", "plain"])
    _check(out["models"]["small"], ("plain",))


@pytest.mark.slow
def test_nccl_qwen3_8b_shaped_bit_exact():
    from benchmarks import bench_multi_gpu as bench

    out = bench.main(["--device", "cuda", "--gpus", str(_gpus()), "--models", "qwen3_8b", "--iters", "1",
                      "--methods", "plain"])
    _check(out["models"]["qwen3_8b"], ("plain",))
