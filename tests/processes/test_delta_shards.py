"""Delta pushes into the TP workers of one engine, each serving only its shard (issue 25): real processes on gloo,
fp32 master weights moved by real AdamW steps, bf16 on the wire, every push compared bit for bit.

Both workers (tests/helpers/shard_roles.py) adopt their shards after push 1: pushes 2 and 3 go as deltas, each
worker writing the changes that fall into its own shard, the base checksum checked by the two together. After push
3 worker 1 changes one of its served elements behind the trainer's back: push 4's delta is refused by both (the
combined base differs) and resent full within the push, which repairs it; pushes 5 and 6 go as deltas again.
"""
import torch

from tests.helpers import adopt_roles as A
from tests.helpers import shard_roles as S
from tests.helpers.cluster import free_port, run_roles
from tests.processes.test_delta_push import same_bits

PUSHES = 6


def shard_of(j: int, name: str, t: torch.Tensor) -> torch.Tensor:
    s = S.shard_slots(j)[name][0]
    return s.source(t.contiguous())


def test_tp_workers_take_deltas_into_their_own_shards():
    port = free_port()
    res = run_roles([("trainer", 0, 1, A.waiting_trainer, (2, port, PUSHES)),
                     ("receiver", 0, 2, S.shard_worker, (1, port, PUSHES)),
                     ("receiver", 1, 2, S.shard_worker, (1, port, PUSHES, 3))], timeout=240)
    states, reports = res[("trainer", 0)]
    reasons = [r["full_reason"] for r in reports]
    assert reasons[0] == "first push (no base version yet)"
    assert reasons[3].startswith("delta refused, resent full: receiver 0: bucket"), reasons[3]
    assert "receiver 1: bucket" in reasons[3], reasons[3]  # the combined check: both refuse the same bucket
    for k in (1, 2, 4, 5):
        assert reasons[k] is None, (k, reasons[k])
        assert 0 < reports[k]["bytes_sent"] < reports[k]["bytes_full"], reports[k]
    for j in range(2):
        for k, ((version, served), want) in enumerate(zip(res[("receiver", j)], states)):
            assert version == k + 1
            for name, t in want.items():
                assert same_bits(served[name], shard_of(j, name, t)), (j, k, name)
    assert not same_bits(states[0]["0.weight"], states[-1]["0.weight"])  # training really moved the bf16 weights
