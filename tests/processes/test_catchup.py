"""P2P catch-up: an engine-side receiver that joins after three pushes pulls exactly the latest version."""
from tests.helpers import roles
from tests.helpers.cluster import free_port, run_roles

import pytest
import torch


def test_joiner_after_three_pushes_gets_the_latest_version_bit_for_bit():
    port = free_port()
    res = run_roles([("trainer", r, 2, roles.catchup_trainer, (1, port, 3)) for r in range(2)]
                    + [("receiver", 0, 1, roles.collect_receiver, (2, port, 3)),
                       ("joiner", 0, 1, roles.joiner, (2, port))], timeout=180)
    state, served0, _ = res[("trainer", 0)]
    _, served1, _ = res[("trainer", 1)]
    version, got = res[("joiner", 0)]
    assert version == 3
    assert set(got) == set(state)
    for name, t in state.items():
        assert torch.equal(got[name], t), name
    # the receiver that saw every push holds the same bytes
    last_version, seen = res[("receiver", 0)][-1]
    assert last_version == 3 and all(torch.equal(seen[n], t) for n, t in state.items())
    # both trainer ranks served their own share, point to point
    assert served0 and served1 and served0[0]["version"] == served1[0]["version"] == 3


def test_catchup_server_stops_with_a_warning_when_rank_0s_store_goes_away():
    """Trainer rank 0 owns the store: when it stops first (the end of a job), another rank's catch-up thread ends
    with a warning that says why, not with a traceback from a daemon thread (which CI once printed)."""
    import threading
    import time
    import warnings

    from trainer_sync.rank.catchup import CatchUpServer, Snapshot
    from trainer_sync.transport.group import Rendezvous

    errors = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    try:
        owner = Rendezvous("127.0.0.1", 0, "tok", is_server=True, timeout_s=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            server = CatchUpServer(owner, 1, 2, Snapshot(), timeout_s=5)
            time.sleep(0.1)
            assert server._thread.is_alive()
            owner.close()  # the last reference to rank 0's store: its server stops
            server._thread.join(timeout=10)
            alive = server._thread.is_alive()
            server.close()
    finally:
        threading.excepthook = hook
    assert not alive
    assert not errors, errors
    assert any("rendezvous store went away" in str(w.message) and "trainer rank 1" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


# ---- a joiner one version behind pulls only the delta ----------------------------------------------------------

def delta_catchup_trainer(rank, world, n, port):
    """Push v1 (full), let the joiner pull it, push v2 (a delta: the receiver holds v1), let the joiner pull again."""
    import time

    from tests.helpers.roles import full_state, mlp, train_step
    from trainer_sync import Sender, SyncConfig

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=30,
                                      keep_latest=True))
    sender.connect(n)
    store = sender.rdzv.store
    reports = []
    for v in (1, 2):
        train_step(model, opt, v)
        reports.append(sender.push().to_dict())
        store.set(f"test/pushed{v}/{rank}", "1")
        while not store.check([f"test/joined{v}"]):  # training goes on meanwhile; the join needs no push
            time.sleep(0.01)
    state, served = full_state(model), list(sender.catchup.served)
    sender.close()
    store.set(f"test/closed/{rank}", "1")
    if rank == 0:
        store.wait([f"test/closed/{r}" for r in range(world)])
    return state, served, reports


def delta_joiner(j, n, m, port, corrupt=False):
    from datetime import timedelta

    import torch.distributed as dist

    from trainer_sync.codec.delta.destination import DeltaDestination
    from trainer_sync.rank.catchup import pull_latest

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dest = DeltaDestination("auto", None, None, torch.device("cpu"))
    out = []
    for v in (1, 2):
        store.wait([f"test/pushed{v}/{r}" for r in range(m)])
        if v == 2 and corrupt:  # the mirror no longer holds v1: the delta must be refused, the full snapshot follow
            next(iter(dest.dest.values()))[0] += 1
        got = {}
        try:
            version = pull_latest("127.0.0.1", port, "tok", m, lambda b: got.update({k: t.clone() for k, t in b}),
                                  timeout_s=30, dest=dest)
        finally:
            store.set(f"test/joined{v}", "1")
        out.append((version, got, {k: t.clone() for k, t in dest.dest.items()}, dest.version))
    return out


@pytest.mark.parametrize("corrupt", [False, True], ids=["at-the-base", "not-at-the-base"])
def test_a_joiner_one_version_behind_pulls_the_delta_bit_for_bit(corrupt):
    """An engine that holds v1 pulls v2 as the delta of the last push, through the receive loop of every push; one
    whose copy is not v1 after all refuses it in the verdict round and gets the full snapshot in the same pull."""
    from tests.helpers.cluster import free_port

    port = free_port()
    res = run_roles([("trainer", r, 2, delta_catchup_trainer, (1, port)) for r in range(2)]
                    + [("receiver", 0, 1, roles.collect_receiver, (2, port, 2)),
                       ("joiner", 0, 1, delta_joiner, (2, port, corrupt))], timeout=180)
    state, served0, reports = res[("trainer", 0)]
    _, served1, _ = res[("trainer", 1)]
    assert reports[1]["full_reason"] is None and reports[1]["bytes_sent"] < reports[1]["bytes_full"]  # a delta push
    (v1, _, _, held1), (v2, got, mirror, held2) = res[("joiner", 0)]
    assert (v1, held1, v2, held2) == (1, 1, 2, 2)
    # the first pull was the full snapshot, the second only the delta (refused: the full snapshot), both ranks
    assert [s["delta"] for s in served0] == [s["delta"] for s in served1] == [False, not corrupt]
    assert set(got) == set(state)
    for name, t in state.items():
        assert torch.equal(got[name], t), name
        assert torch.equal(mirror[name].view(t.shape), t), name
