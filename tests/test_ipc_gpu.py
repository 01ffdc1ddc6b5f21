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

import ipc_roles
from procs import free_port, run_roles

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


def _check(t, r, wire=None):
    assert t["diag"]["ipc"] and r["diag"]["ipc"], "the push did not go by CUDA IPC"
    assert t["prints"] == r["prints"]  # bit-level fingerprints, computed on the GPU, after every push
    for name, want in t["state"].items():
        want = (want.to(wire) if wire is not None else want).contiguous()
        assert torch.equal(r["state"][name].view(torch.uint8), want.view(torch.uint8)), name
    assert torch.equal(r["state"]["lm_head.weight"], r["state"]["embed.weight"])


def test_auto_picks_ipc_direct_bit_for_bit():
    """Default config ("auto") on one GPU chooses ipc; receivers read trainer parameters in place; a re-allocated
    parameter is exported anew and the old export released."""
    t, r = _run({"bucket_mb": 0.002}, pushes=4, backend="nccl", realloc_at=2)
    _check(t, r)
    n = len(ipc_roles.SHAPES) - 1
    assert t["diag"]["exports"] == [n, n, n + 1, n + 1] and t["diag"]["held"] == [n] * 4


@pytest.mark.parametrize("num_buffers", [2, 1])
def test_ipc_staged_cast_bit_for_bit(num_buffers):
    """fp32 trainer -> bf16 receiver: packed and cast on the device into exported, re-used bucket buffers."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "num_buffers": num_buffers, "wire_dtype": "bfloat16"}
    t, r = _run(cfg, pushes=3, dtype="float32", recv_dtype="bfloat16")
    _check(t, r, wire=torch.bfloat16)
    assert t["reports"][0]["num_buckets"] > 3 and len(set(t["diag"]["exports"])) == 1


def test_ipc_staged_same_dtype_bit_for_bit():
    t, r = _run({"mode": "ipc", "bucket_mb": 0.002, "ipc_direct": False}, pushes=3)
    _check(t, r)


@pytest.mark.parametrize("direct", [True, False])
def test_ipc_20_pushes_memory_back_to_baseline(direct):
    cfg = {"mode": "ipc", "bucket_mb": 32, "ipc_direct": direct}
    t, r = _run(cfg, pushes=20, measure=True, realloc_at=5 if direct else None, model="big")
    _check(t, r)
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
