"""Core data path with real processes on gloo: trainer ranks -> bridging group -> receivers, bit for bit."""
import torch

from tests.helpers import roles
from tests.helpers.cluster import free_port, run_roles

PUSHES = 3


def assert_bitwise(states, received):
    for push, ((version, got), want) in enumerate(zip(received, states)):
        assert version == push + 1
        assert set(got) == set(want), (push, sorted(got), sorted(want))
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (push, name)
    # the weights really changed between pushes (training happened), so equality is not trivial
    assert not torch.equal(states[0]["0.weight"], states[-1]["0.weight"])


def test_fsdp2_two_ranks_to_two_receivers():
    port = free_port()
    res = run_roles([("trainer", r, 2, roles.fsdp_trainer, (2, port, PUSHES)) for r in range(2)]
                    + [("receiver", j, 2, roles.collect_receiver, (2, port, PUSHES)) for j in range(2)])
    states, reports = res[("trainer", 0)]
    for j in range(2):
        assert_bitwise(states, res[("receiver", j)])
    # every rank sends its own shard: the packed bytes are split over both ranks
    total = reports[0]["bytes"]
    assert reports[0]["local_bytes"] < total and res[("trainer", 1)][1][0]["local_bytes"] < total


def test_zero3_two_ranks_to_one_receiver():
    port = free_port()
    res = run_roles([("trainer", r, 2, roles.zero3_trainer, (1, port, PUSHES)) for r in range(2)]
                    # 90 s to reach the store: the trainer ranks import DeepSpeed first (over 20 s on a loaded 2-core
                    # box)
                    + [("receiver", 0, 1, roles.collect_receiver, (2, port, PUSHES, None, "tok", 90.0))], timeout=240)
    states, _ = res[("trainer", 0)]
    assert_bitwise(states, res[("receiver", 0)])


def test_plain_module_one_rank_to_three_receivers():
    port = free_port()
    res = run_roles([("trainer", 0, 1, roles.plain_trainer, (3, port, PUSHES))]
                    + [("receiver", j, 3, roles.collect_receiver, (1, port, PUSHES)) for j in range(3)])
    states, reports = res[("trainer", 0)]
    for j in range(3):
        assert_bitwise(states, res[("receiver", j)])
    assert all(r["num_buckets"] > 1 for r in reports)  # small buckets: the pipeline really ran several
