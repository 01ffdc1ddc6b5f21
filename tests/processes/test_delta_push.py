"""Delta pushes through the real push path (issue 16): trainer ranks on gloo, fp32 master weights moved by real
AdamW steps, bf16 on the wire, receivers keeping a mirror or writing into their targets in place.

Every test compares each receiver's tensors with the trainer's bf16 weights bit for bit after every push, and checks
the report: the first push is full (no base yet), later ones carry only the changes (bytes_sent < bytes_full, a
changed fraction strictly between 0 and 1), and a push that could not go as deltas says why (full_reason)."""
import torch

from tests.helpers import delta_roles as R
from tests.helpers.cluster import free_port, run_roles

PUSHES = 20


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def assert_exact(states, received, start=1):
    assert len(received) == len(states)
    for push, ((version, got, *rest), want) in enumerate(zip(received, states)):
        assert version == push + start
        assert set(got) == set(want), (push, sorted(got))
        for name, t in want.items():
            assert same_bits(got[name], t), (push, name)
        if rest and rest[0] is not None:  # targets mode: the targets themselves hold the version, handed out as such
            after, handed_targets = rest
            for name, t in want.items():
                assert same_bits(after[name], t), (push, name, "target")
            assert handed_targets, push


def assert_delta_reports(reports):
    first, rest = reports[0], reports[1:]
    assert first["full_reason"] == "first push (no base version yet)" and first["changed_fraction"] is None
    assert first["bytes_sent"] == first["bytes_full"] == first["bytes"]
    for r in rest:
        assert r["full_reason"] is None, r
        assert r["bytes_full"] == r["bytes"] and 0 < r["bytes_sent"] < r["bytes_full"], r
        assert 0 < r["changed_fraction"] < 1, r


def test_plain_one_rank_mirror_and_targets_receivers():
    port = free_port()
    res = run_roles([("trainer", 0, 1, R.adamw_trainer, (2, port, PUSHES))]
                    + [("receiver", 0, 2, R.delta_receiver, (1, port, PUSHES)),
                       ("receiver", 1, 2, R.delta_receiver, (1, port, PUSHES, True))], timeout=240)
    states, reports = res[("trainer", 0)]
    assert_delta_reports(reports)
    for j in range(2):
        assert_exact(states, res[("receiver", j)])
    assert not same_bits(states[0]["0.weight"], states[-1]["0.weight"])  # training really moved the bf16 weights


def test_fsdp2_two_ranks_20_adamw_delta_pushes():
    port = free_port()
    res = run_roles([("trainer", r, 2, R.adamw_trainer, (2, port, PUSHES, "fsdp")) for r in range(2)]
                    + [("receiver", 0, 2, R.delta_receiver, (2, port, PUSHES)),
                       ("receiver", 1, 2, R.delta_receiver, (2, port, PUSHES, True))], timeout=300)
    states, reports = res[("trainer", 0)]
    assert_delta_reports(reports)
    assert reports == res[("trainer", 1)][1] or all(  # every rank reports the same totals
        a[k] == b[k] for a, b in zip(reports, res[("trainer", 1)][1])
        for k in ("bytes_sent", "bytes_full", "changed_fraction", "full_reason"))
    for j in range(2):
        assert_exact(states, res[("receiver", j)])


def test_zero3_two_ranks_20_adamw_delta_pushes():
    port = free_port()
    # 120 s each way: the trainer ranks import DeepSpeed first (slow on a loaded 2-core box), and a receiver that
    # found no store yet retries only after a back-off of up to ~30 s (TCPStore's client)
    res = run_roles([("trainer", r, 2, R.adamw_trainer, (1, port, PUSHES, "zero3", 1e-4, {"timeout_s": 120}))
                     for r in range(2)]
                    + [("receiver", 0, 1, R.delta_receiver, (2, port, PUSHES, False, None, 120.0))], timeout=500)
    states, reports = res[("trainer", 0)]
    assert_delta_reports(reports)
    assert_exact(states, res[("receiver", 0)])


def test_receiver_that_missed_a_version_gets_a_full_push():
    """Epoch 0: receivers A and B take v1 (full) and v2 (delta). Epoch 1: A alone takes v3 (a delta: A said at its
    join that it holds v2). Epoch 2: A, B (still holding v2: it missed v3) and C (new) -> v4 goes full, saying why;
    v5 goes as deltas again. Every push bit-exact on every receiver that took it."""
    port = free_port()
    plan = [(2, 2), (1, 1), (3, 2)]
    res = run_roles([("trainer", 0, 1, R.epochs_trainer, (port, plan))]
                    + [("receiver", 0, 1, R.epochs_receiver, (port, [(0, 0, 2, 2), (1, 0, 1, 1), (2, 0, 3, 2)])),
                       ("receiver", 1, 1, R.epochs_receiver, (port, [(0, 1, 2, 2), (2, 1, 3, 2)])),
                       ("receiver", 2, 1, R.epochs_receiver, (port, [(2, 2, 3, 2)]))], timeout=240)
    states, reports = res[("trainer", 0)]
    reasons = [r["full_reason"] for r in reports]
    assert reasons[0] == "first push (no base version yet)"
    assert reasons[1] is None and reasons[2] is None and reasons[4] is None, reasons
    assert "receiver 1 holds version 2, not the base version 3 (it missed a push)" in reasons[3], reasons[3]
    assert "receiver 2 holds no version (joined late or restarted)" in reasons[3], reasons[3]
    assert reports[3]["bytes_sent"] == reports[3]["bytes_full"] and reports[3]["changed_fraction"] is None
    assert reports[4]["bytes_sent"] < reports[4]["bytes_full"]
    assert_exact(states, res[("receiver", 0)])
    assert_exact([states[i] for i in (0, 1, 3, 4)], [(v - (v > 2), g) for v, g in res[("receiver", 1)]])
    assert_exact(states[3:], res[("receiver", 2)], start=4)


def test_refused_delta_is_resent_full_within_the_push():
    """A receiver's target is changed behind the trainer's back after push 2: push 3's delta does not match its
    base, the receiver refuses it before writing, and the trainer resends push 3 full at once to everyone; the
    tensors the delta pass had already delivered are not handed out twice. Push 4 goes as deltas again."""
    port = free_port()
    res = run_roles([("trainer", 0, 1, R.adamw_trainer, (2, port, 4))]
                    + [("receiver", 0, 2, R.delta_receiver, (1, port, 4, True, 1)),
                       ("receiver", 1, 2, R.delta_receiver, (1, port, 4))], timeout=240)
    states, reports = res[("trainer", 0)]
    assert reports[1]["full_reason"] is None and reports[3]["full_reason"] is None
    reason = reports[2]["full_reason"]
    assert reason.startswith("delta refused, resent full: receiver 0: bucket "), reason
    assert "does not hold the base values" in reason, reason
    assert reports[2]["bytes_sent"] > reports[2]["bytes_full"]  # the delta and then the full push
    for j in range(2):
        assert_exact(states, res[("receiver", j)])


def test_delta_off_always_full():
    port = free_port()
    res = run_roles([("trainer", 0, 1, R.adamw_trainer, (1, port, 3, "plain", 1e-4, {"delta": "off"}))]
                    + [("receiver", 0, 1, R.delta_receiver, (1, port, 3))], timeout=120)
    states, reports = res[("trainer", 0)]
    assert all(r["full_reason"] == "delta off (SyncConfig.delta)" and r["bytes_sent"] == r["bytes_full"]
               for r in reports), reports
    assert_exact(states, res[("receiver", 0)])


def test_wrong_targets_fail_the_push_naming_the_tensor():
    port = free_port()
    from tests.helpers.cluster import outcomes

    out = outcomes([("trainer", 0, 1, R.adamw_trainer, (1, port, 1))]
                   + [("receiver", 0, 1, R.bad_targets_receiver, (1, port))], timeout=120)
    status, err = out[("receiver", 0)]
    assert status == "ok", err
    assert "target 2.weight is [40, 40] float32, the trainer sends [40, 40] bfloat16" in err, err
    assert out[("trainer", 0)][0] == "error"  # the push failed (the receiver gave up before any byte moved)
