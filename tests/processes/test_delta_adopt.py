"""Delta targets adopted at run time (Receiver(adopts_targets=True)): the vLLM GPU backend's way to take deltas
straight into the served parameter slices once its fast path is proven, with no mirror. Real processes on gloo, fp32
master weights moved by real AdamW steps, bf16 on the wire; every push compared bit for bit.

Receiver 0 adopts its served tensors after push 2, drops them after push 4 and adopts them again after push 5;
receiver 1 keeps a mirror. Pushes 1 and 2 go full (no base; then receiver 0 has no targets yet), 3 and 4 as deltas
written straight into receiver 0's served tensors, 5 full (receiver 0 dropped them, and says why), 6 as deltas again.
"""
from tests.helpers import adopt_roles as A
from tests.helpers.cluster import free_port, run_roles
from tests.processes.test_delta_push import same_bits

ACTIONS = ["", "adopt", "", "drop", "adopt", ""]


def test_receiver_adopting_and_dropping_targets_mid_run():
    port, pushes = free_port(), len(ACTIONS)
    res = run_roles([("trainer", 0, 1, A.waiting_trainer, (2, port, pushes)),
                     ("receiver", 0, 2, A.adopting_receiver, (1, port, ACTIONS)),
                     ("receiver", 1, 2, A.mirror_receiver, (1, port, pushes))], timeout=240)
    states, reports = res[("trainer", 0)]
    reasons = [r["full_reason"] for r in reports]
    assert reasons[0] == "first push (no base version yet)"
    assert reasons[1].startswith("receiver 0 cannot apply deltas (it has no delta targets yet"), reasons[1]
    assert reasons[4] == "receiver 0 cannot apply deltas (the engine re-processes a layer)", reasons[4]
    for k in (0, 1, 4):
        assert reports[k]["bytes_sent"] == reports[k]["bytes_full"] and reports[k]["changed_fraction"] is None
    for k in (2, 3, 5):  # deltas against the push before, straight into receiver 0's served tensors
        assert reasons[k] is None, (k, reasons[k])
        assert 0 < reports[k]["bytes_sent"] < reports[k]["bytes_full"], reports[k]
    adopted = res[("receiver", 0)]
    for k, ((version, served, handed_targets), want) in enumerate(zip(adopted, states)):
        assert version == k + 1
        for name, t in want.items():
            assert same_bits(served[name], t), (k, name)
        assert handed_targets == (k in (2, 3, 5)), k  # on_batch got the targets themselves exactly then
    for k, ((version, got), want) in enumerate(zip(res[("receiver", 1)], states)):
        assert version == k + 1 and all(same_bits(got[name], t) for name, t in want.items()), k
    assert not same_bits(states[0]["0.weight"], states[-1]["0.weight"])  # training really moved the bf16 weights
