"""mode="ipc" on CPU: refused with a clear error; the IPC protocol (manifests, export re-use and release, staged flow
control, the core hooks, and the mixed layout: FSDP2 over two "GPUs" with receivers colocated on them, IPC for the
local shard and gloo for the other) checked with a host-memory stand-in for the CUDA calls (which GPU a process
reports is the stand-in's too). Which hop goes by which transport is unit-tested in test_layout.py.

The real CUDA IPC runs in tests/gpu/test_ipc_gpu.py (device tool).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ipc_roles
from tests.helpers.cluster import free_port, outcomes, run_roles
from trainer_sync import Sender, SyncConfig, SyncError
from trainer_sync.transport import cuda


def test_ipc_refused_on_cpu():
    model = torch.nn.Linear(4, 4)  # a CPU model: no CUDA IPC, whatever the machine has
    with pytest.raises(SyncError, match="mode='ipc' needs the trainer rank and the receiver on one CUDA GPU"):
        Sender(model, SyncConfig(mode="ipc", token="t"))
    if not torch.cuda.is_available():
        with pytest.raises(SyncError, match="CUDA is not available"):
            cuda.require(torch.device("cpu"), "receiver 0")


def _run(cfg, pushes, dtype="float32", recv_dtype=None, realloc_at=None):
    port = free_port()
    out = run_roles([
        ("trainer", 0, 1, ipc_roles.trainer, (port, 0, "cpu", dtype, cfg, pushes, True, False, realloc_at)),
        ("receiver", 0, 1, ipc_roles.receiver, (port, 0, "cpu", recv_dtype or dtype, "gloo", pushes, True)),
    ], timeout=120)
    return out[("trainer", 0)], out[("receiver", 0)]


def test_ipc_direct_protocol_host_standin():
    """Receiver reads the trainer's parameters in place; exports re-used across pushes; a re-allocated parameter is
    exported anew and the old export released after that push."""
    t, r = _run({"mode": "ipc", "bucket_mb": 0.002}, pushes=4, realloc_at=2)
    ipc_roles.check_pair(t, r)
    n = len(ipc_roles.SHAPES) - 1  # one export per non-empty parameter storage
    assert t["diag"]["exports"] == [n, n, n + 1, n + 1]  # exported once; the re-allocated one once more
    assert t["diag"]["held"] == [n] * 4  # ...and the old one released at the end of the push that replaced it
    assert r["diag"]["mapped"] == [n] * 4


@pytest.mark.parametrize("num_buffers", [2, 1])
def test_ipc_staged_protocol_host_standin(num_buffers):
    """fp32 trainer -> bf16 receiver: packed (and cast) into exported bucket buffers, many small buckets."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "num_buffers": num_buffers, "wire_dtype": "bfloat16"}
    t, r = _run(cfg, pushes=3, dtype="float32", recv_dtype="bfloat16")
    ipc_roles.check_pair(t, r, wire=torch.bfloat16)
    assert t["reports"][0]["num_buckets"] > 3
    assert len(set(t["diag"]["held"])) == 1  # the same buffers every push


@pytest.mark.parametrize("receivers", [[0, 1], [0]], ids=["engine-per-gpu", "one-engine"])
def test_fsdp2_two_gpus_colocated_engines_direct(receivers):
    """FSDP2 on "GPUs" 0 and 1. Each receiver maps the shard of the trainer rank on its own GPU in place (IPC,
    direct) and gets the other rank's shard through that rank's group (gloo here, NCCL on GPUs); bit for bit."""
    ts, rs = ipc_roles.run_colocated({"mode": "auto", "bucket_mb": 0.002}, 2, receivers, standin=True)
    ipc_roles.check_colocated(ts, rs, receivers)


def test_fsdp2_two_gpus_colocated_staged_cast_over_both_transports():
    """fp32 FSDP2 shards -> bf16 engines: each bucket is packed (and cast) once into an exported buffer, which the
    colocated receiver maps and the other GPU's receiver gets by broadcast of that same buffer."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "wire_dtype": "bfloat16"}
    ts, rs = ipc_roles.run_colocated(cfg, 2, [0, 1], dtype="float32", recv_dtype="bfloat16", standin=True)
    ipc_roles.check_colocated(ts, rs, [0, 1], wire=torch.bfloat16)


@pytest.mark.parametrize("direct", [True, False])
def test_ipc_trainer_and_engine_in_one_process_host_standin(direct):
    """An in-process engine (TRL's colocate mode): the receiver takes the trainer's own tensors and events instead of
    opening its handles, which CUDA IPC (and this stand-in) refuses within one process."""
    cfg = {"mode": "ipc", "bucket_mb": 0.002, "ipc_direct": direct}
    out = run_roles([("trainer", 0, 1, ipc_roles.same_process, (free_port(), "cpu", "float32", cfg, 3, True))],
                    timeout=120)
    ipc_roles.check_pair(*out[("trainer", 0)])


def test_colocated_receiver_killed_mid_push_is_named_by_both_trainer_ranks():
    """FSDP2 on "GPUs" 0 and 1, an engine on each; receiver 1 is SIGKILLed on the first batch of push 2. Trainer rank 0
    (its wire peer) and trainer rank 1 (its IPC peer) both fail with an error naming receiver 1 within the timeout;
    receiver 0, which got rank 0's shard by IPC and rank 1's over the wire, is not blamed."""
    port, cfg = free_port(), {"bucket_mb": 0.002, "num_receivers": 2, "timeout_s": 6}
    out = outcomes(
        [("trainer", r, 2, ipc_roles.trainer, (port, 0, "cpu", "float32", cfg, 2, True, False, None, "small",
                                               f"gpu{r}", 10.0)) for r in range(2)] +
        [("receiver", j, 2, ipc_roles.receiver, (port, 0, "cpu", "float32", "gloo", 2, True, False, "small", 2,
                                                 f"gpu{j}", 1 if j == 1 else None)) for j in range(2)], timeout=120)
    for r in range(2):
        status, text = out[("trainer", r)]
        assert status == "error" and "SyncError" in text and "receiver 1" in text, text[-1500:]
        assert "receiver 0 stalled" not in text
