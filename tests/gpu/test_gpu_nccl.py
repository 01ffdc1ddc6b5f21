"""NCCL bridging group across two GPUs: bit for bit after 100 pushes, GPU memory flat (device tool, x2 machine)."""
import pytest
import torch

from tests.helpers import gpu_roles
from tests.helpers.cluster import free_port, run_roles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs 2 CUDA GPUs")]


def test_hundred_nccl_pushes_bit_for_bit_with_flat_gpu_memory():
    port, pushes, warmup = free_port(), 100, 10
    res = run_roles([("trainer", 0, 1, gpu_roles.nccl_trainer, (port, pushes, warmup)),
                     ("receiver", 0, 1, gpu_roles.nccl_receiver, (port, pushes, warmup))], timeout=600)
    t_usage, state, last = res[("trainer", 0)]
    r_usage, got = res[("receiver", 0)]
    for usage in (t_usage, r_usage):
        a, b = usage[warmup], usage[pushes]
        assert b["allocated"] == a["allocated"], (a, b)
        assert abs(b["free"] - a["free"]) <= 2 * 2**20, (a, b)
    assert set(got) == set(state)
    for name, t in state.items():
        assert torch.equal(got[name], t), name
    print("last push:", last)
