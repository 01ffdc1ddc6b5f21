"""mode="ipc" on CPU: refused with a clear error; "auto" decides by GPU UUID; the IPC protocol (manifests, export
re-use and release, staged flow control, the core hooks) checked with a host-memory stand-in for the CUDA calls.

The real CUDA IPC runs in tests/test_ipc_gpu.py (device tool).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ipc_roles
from procs import free_port, run_roles
from trainer_sync import Sender, SyncConfig, SyncError
from trainer_sync.transport import ipc
from trainer_sync.transport.group import Member


def test_ipc_refused_on_cpu():
    model = torch.nn.Linear(4, 4)  # a CPU model: no CUDA IPC, whatever the machine has
    with pytest.raises(SyncError, match="mode='ipc' needs the trainer rank and the receiver on one CUDA GPU"):
        Sender(model, SyncConfig(mode="ipc", token="t"))
    if not torch.cuda.is_available():
        with pytest.raises(SyncError, match="CUDA is not available"):
            ipc.require(torch.device("cpu"), "receiver 0")


def _decide(configured, uuids, num_trainers=1):
    store = dist.HashStore()
    for key, u in uuids.items():
        store.set(f"ipc/gpu/{key}", u)
    num_receivers = sum(k.startswith("receiver") for k in uuids)
    out = ipc.agree_mode(store, Member("trainer", 0), configured, uuids["trainer0"], num_trainers, num_receivers, 5)
    assert ipc.agree_mode(store, Member("receiver", 0), "", uuids.get("receiver0", ""), num_trainers,
                          num_receivers, 5) == out  # every member reads the same decision
    return out


def test_auto_picks_ipc_only_on_one_gpu():
    assert _decide("auto", {"trainer0": "GPU-a", "receiver0": "GPU-a"}) == "ipc"
    assert _decide("auto", {"trainer0": "GPU-a", "receiver0": "GPU-b"}) == "broadcast"
    assert _decide("auto", {"trainer0": "", "receiver0": ""}) == "broadcast"  # CPU processes
    assert _decide("auto", {"trainer0": "GPU-a", "trainer1": "GPU-a", "receiver0": "GPU-b"}, 2) == "broadcast"
    assert _decide("broadcast", {"trainer0": "GPU-a", "receiver0": "GPU-a"}) == "broadcast"
    with pytest.raises(SyncError, match="receiver 0 is on GPU-b"):
        _decide("ipc", {"trainer0": "GPU-a", "receiver0": "GPU-b"})


def test_fsdp_over_two_gpus_with_an_engine_on_one_of_them_is_refused_clearly():
    """FSDP2 on GPU-a and GPU-b, the engine colocated on GPU-a: NCCL cannot carry trainer rank 0's shard to a
    receiver on its own GPU, and the mixed NCCL + IPC path is not built: a clear error, not a failure inside NCCL."""
    with pytest.raises(SyncError, match="trainer rank 0, receiver 0 share GPU.*GPU-a.*cannot yet mix NCCL"):
        _decide("auto", {"trainer0": "GPU-a", "trainer1": "GPU-b", "receiver0": "GPU-a"}, 2)


def _run(cfg, pushes, dtype="float32", recv_dtype=None, realloc_at=None):
    port = free_port()
    out = run_roles([
        ("trainer", 0, 1, ipc_roles.trainer, (port, 0, "cpu", dtype, cfg, pushes, True, False, realloc_at)),
        ("receiver", 0, 1, ipc_roles.receiver, (port, 0, "cpu", recv_dtype or dtype, "gloo", pushes, True)),
    ], timeout=120)
    return out[("trainer", 0)], out[("receiver", 0)]


def _check(t, r, wire=None):
    assert t["diag"]["ipc"] and r["diag"]["ipc"]
    assert t["prints"] == r["prints"]  # bit-level fingerprints after every push
    for name, want in t["state"].items():
        want = want.to(wire) if wire is not None else want
        assert torch.equal(r["state"][name].view(torch.uint8), want.contiguous().view(torch.uint8)), name
    assert torch.equal(r["state"]["lm_head.weight"], r["state"]["embed.weight"])  # tied alias arrived too


def test_ipc_direct_protocol_host_standin():
    """Receiver reads the trainer's parameters in place; exports re-used across pushes; a re-allocated parameter is
    exported anew and the old export released after that push."""
    t, r = _run({"mode": "ipc", "bucket_mb": 0.002}, pushes=4, realloc_at=2)
    _check(t, r)
    n = len(ipc_roles.SHAPES) - 1  # one export per non-empty parameter storage
    assert t["diag"]["exports"] == [n, n, n + 1, n + 1]  # exported once; the re-allocated one once more
    assert t["diag"]["held"] == [n] * 4  # ...and the old one released at the end of the push that replaced it
    assert r["diag"]["mapped"] == [n] * 4


@pytest.mark.parametrize("num_buffers", [2, 1])
def test_ipc_staged_protocol_host_standin(num_buffers):
    """fp32 trainer -> bf16 receiver: packed (and cast) into exported bucket buffers, many small buckets."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "num_buffers": num_buffers, "wire_dtype": "bfloat16"}
    t, r = _run(cfg, pushes=3, dtype="float32", recv_dtype="bfloat16")
    _check(t, r, wire=torch.bfloat16)
    assert t["reports"][0]["num_buckets"] > 3
    assert len(set(t["diag"]["held"])) == 1  # the same buffers every push
