"""CUDA IPC between two processes on one GPU (run through the device tool; skipped where CUDA is unavailable).

Bit-for-bit equality after every push (direct and staged paths, a cast, one and two buffers, "auto" choosing ipc),
repeated pushes, and device memory back where it was (torch.cuda.mem_get_info read by both processes while both are
idle).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import ipc_roles
from tests.helpers.cluster import free_port, run_roles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 2**20
TOLERANCE = 4 * MiB  # a leaked bucket buffer or parameter export in these tests is 16 MiB or more


def _run(cfg, pushes, dtype="bfloat16", recv_dtype=None, backend="gloo", measure=False, realloc_at=None,
         model="small"):
    port, bar = free_port(), free_port()
    out = run_roles([
        ("trainer", 0, 1, ipc_roles.trainer,
         (port, bar, "cuda:0", dtype, cfg, pushes, False, measure, realloc_at, model)),
        ("receiver", 0, 1, ipc_roles.receiver,
         (port, bar, "cuda:0", recv_dtype or dtype, backend, pushes, False, measure, model)),
    ], timeout=300)
    return out[("trainer", 0)], out[("receiver", 0)]


def test_auto_picks_ipc_direct_bit_for_bit():
    """Default config ("auto") on one GPU chooses ipc; receivers read trainer parameters in place; a re-allocated
    parameter is exported anew and the old export released."""
    t, r = _run({"bucket_mb": 0.002}, pushes=4, backend="nccl", realloc_at=2)
    ipc_roles.check_pair(t, r)
    n = len(ipc_roles.SHAPES) - 1
    assert t["diag"]["exports"] == [n, n, n + 1, n + 1] and t["diag"]["held"] == [n] * 4


@pytest.mark.parametrize("num_buffers", [2, 1])
def test_ipc_staged_cast_bit_for_bit(num_buffers):
    """fp32 trainer -> bf16 receiver: packed and cast on the device into exported, re-used bucket buffers."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "num_buffers": num_buffers, "wire_dtype": "bfloat16"}
    t, r = _run(cfg, pushes=3, dtype="float32", recv_dtype="bfloat16")
    ipc_roles.check_pair(t, r, wire=torch.bfloat16)
    assert t["reports"][0]["num_buckets"] > 3 and len(set(t["diag"]["exports"])) == 1


def test_ipc_staged_same_dtype_bit_for_bit():
    t, r = _run({"mode": "ipc", "bucket_mb": 0.002, "ipc_direct": False}, pushes=3)
    ipc_roles.check_pair(t, r)


@pytest.mark.parametrize("direct", [True, False])
def test_ipc_20_pushes_memory_back_to_baseline(direct):
    cfg = {"mode": "ipc", "bucket_mb": 32, "ipc_direct": direct}
    t, r = _run(cfg, pushes=20, measure=True, realloc_at=5 if direct else None, model="big")
    ipc_roles.check_pair(t, r)
    report = {"direct": direct, "trainer": t["mem"], "receiver": r["mem"],
              "push_ms": [round(x["total_s"] * 1e3, 2) for x in t["reports"]]}
    print(json.dumps(report))
    if os.environ.get("IPC_TEST_REPORT"):
        with open(os.environ["IPC_TEST_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")
    for side in (t["mem"], r["mem"]):
        # each process's own allocations: exactly the same after push 20 as after push 1, and after close as before
        assert side["after_push20_allocated"] == side["after_push1_allocated"], side
        assert side["after_close_allocated"] == side["baseline_allocated"], side
        # the device as a whole (torch.cuda.mem_get_info), both processes idle
        assert abs(side["after_push20"] - side["after_push1"]) <= TOLERANCE, side  # pushes 2..20 allocate nothing
        assert abs(side["after_close"] - side["baseline"]) <= TOLERANCE, side  # close releases everything
        if direct:
            assert abs(side["after_push1"] - side["baseline"]) <= TOLERANCE, side  # direct allocates nothing at all
        else:
            assert side["baseline"] - side["after_push1"] >= 2 * 32 * MiB - TOLERANCE, side  # the two buffers


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)")


@two_gpus
@pytest.mark.parametrize("receivers", [[0, 1], [0]], ids=["engine-per-gpu", "one-engine"])
def test_fsdp2_two_gpus_colocated_nccl_and_ipc_bit_for_bit(receivers):
    """FSDP2 over GPUs 0 and 1 with engines colocated: the local shard by CUDA IPC (in place), the other GPU's over
    NCCL, in one push; bit for bit after every push."""
    ts, rs = ipc_roles.run_colocated({"bucket_mb": 0.002}, 2, receivers, dtype="bfloat16", backend="nccl")
    ipc_roles.check_colocated(ts, rs, receivers)


@two_gpus
def test_fsdp2_two_gpus_colocated_staged_cast_bit_for_bit():
    """fp32 shards -> bf16 engines: one pack per bucket into an exported buffer that the colocated engine maps and
    NCCL broadcasts to the other GPU's engine."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "wire_dtype": "bfloat16"}
    ts, rs = ipc_roles.run_colocated(cfg, 2, [0, 1], dtype="float32", recv_dtype="bfloat16", backend="nccl")
    ipc_roles.check_colocated(ts, rs, [0, 1], wire=torch.bfloat16)


@pytest.mark.parametrize("direct", [True, False])
def test_ipc_trainer_and_engine_in_one_process(direct):
    """An in-process engine on the trainer's GPU (TRL's colocate mode): no CUDA IPC handle is opened in the process
    that made it; bit for bit."""
    cfg = {"bucket_mb": 0.002, "ipc_direct": direct}
    out = run_roles([("trainer", 0, 1, ipc_roles.same_process,
                      (free_port(), "cuda:0", "bfloat16", cfg, 3, False, "nccl"))], timeout=300)
    ipc_roles.check_pair(*out[("trainer", 0)])


def test_cuda_ipc_refuses_a_handle_of_its_own_process():
    """Why the in-process shortcut exists: opening this process's own CUDA IPC handle fails."""
    from trainer_sync.transport import cuda

    base = torch.empty(1 << 20, dtype=torch.uint8, device="cuda:0")
    with pytest.raises(Exception):
        cuda.backend.open(cuda.backend.export(base), torch.device("cuda:0"))
