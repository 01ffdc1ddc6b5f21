"""Faults caused for real: a receiver SIGKILLed mid-push, a trainer rank SIGKILLed mid-push, a stalled receiver,
NaN weights, a stale version, and 100 pushes with flat resources."""
import socket

import pytest
import torch

from tests.helpers import roles
from tests.helpers.cluster import free_port, outcomes, run_roles
from trainer_sync import Sender, SyncConfig


def test_receiver_killed_mid_push_is_named_within_the_timeout():
    port = free_port()
    out = outcomes([("trainer", 0, 1, roles.fault_trainer, (2, port, {"timeout_s": 8})),
                    ("receiver", 0, 2, roles.fault_receiver, (1, port, None, 8.0)),
                    ("receiver", 1, 2, roles.fault_receiver, (1, port, "kill", 8.0))], timeout=90)
    status, value = out[("trainer", 0)]
    kind, msg, seconds = value
    assert kind == "SyncError" and "receiver 1" in msg, msg
    assert "receiver 0" not in msg.split(";")[-1].split("(")[0]
    assert seconds < 8 + 5 + 5
    assert ("receiver", 1) not in out or out[("receiver", 1)][0] == "error"  # it died


def test_trainer_killed_mid_push_fails_receivers_within_the_timeout():
    port = free_port()
    out = outcomes([("trainer", 0, 1, roles.dying_trainer, (1, port)),
                    ("receiver", 0, 1, roles.fault_receiver, (1, port, None, 6.0))], timeout=90)
    kind, msg, seconds = out[("receiver", 0)][1]
    assert kind == "SyncError" and "trainer rank 0" in msg, msg
    assert seconds < 6 + 5


def test_stalled_receiver_is_named_after_the_bucket_timeout():
    port = free_port()
    out = outcomes([("trainer", 0, 1, roles.fault_trainer, (2, port, {"bucket_timeout_s": 2.0})),
                    ("receiver", 0, 2, roles.fault_receiver, (1, port, None)),
                    ("receiver", 1, 2, roles.fault_receiver, (1, port, "stall"))], timeout=120)
    kind, msg, seconds = out[("trainer", 0)][1]
    assert kind == "SyncError" and "receiver 1 stalled or gone" in msg, msg
    assert seconds < 2 + 5 + 3


def test_nan_weights_are_refused_before_any_byte_moves():
    port = free_port()
    res = run_roles([("trainer", r, 2, roles.nan_trainer, (1, port)) for r in range(2)]
                    + [("receiver", 0, 1, roles.refusing_receiver, (2, port, None))])
    for r in range(2):
        assert res[("trainer", r)] == ["trainer rank 1: 2.weight holds NaN or Inf"]
    err, applied = res[("receiver", 0)]
    assert "2.weight holds NaN" in err and applied == 0


def test_version_not_newer_is_refused_and_the_next_push_works():
    port = free_port()
    res = run_roles([("trainer", 0, 1, roles.version_trainer, (1, port)),
                     ("receiver", 0, 1, roles.collect_receiver, (1, port, 2))])
    first, stale, second = res[("trainer", 0)]
    assert first == 5 and "version 5 is not newer than the last pushed (5)" in stale and second == 6
    assert [v for v, _ in res[("receiver", 0)]] == [5, 6]


def test_store_listens_on_the_configured_interface_only_and_token_is_never_printed():
    sender = Sender(roles.mlp(), SyncConfig(host="127.0.0.1", token="s3cret-token"))
    try:
        port = sender.rdzv.port
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
        info = sender.join_info(0, 1)
        assert "s3cret-token" not in repr(info) and "s3cret-token" not in str(info)
        assert info.to_dict()["token"] == "s3cret-token"  # it does travel to the engine, in the init info
    finally:
        sender.close()


@pytest.mark.slow
def test_hundred_pushes_keep_memory_fds_and_threads_flat():
    port, pushes, warmup = free_port(), 100, 10
    res = run_roles([("trainer", r, 2, roles.load_trainer, (2, port, pushes, warmup)) for r in range(2)]
                    + [("receiver", j, 2, roles.load_receiver, (2, port, pushes, warmup)) for j in range(2)],
                    timeout=600)
    for key, (usage, _) in res.items():
        a, b = usage[warmup], usage[pushes]
        assert b["fds"] <= a["fds"] and b["threads"] <= a["threads"], (key, a, b)
        assert b["rss"] - a["rss"] < 8 * 2**20, (key, a, b)
    state = res[("trainer", 0)][1]
    for j in range(2):
        got = res[("receiver", j)][1]
        assert all(torch.equal(got[n], t) for n, t in state.items())
