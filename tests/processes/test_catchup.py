"""P2P catch-up: an engine-side receiver that joins after three pushes pulls exactly the latest version."""
from tests.helpers import roles
from tests.helpers.cluster import free_port, run_roles

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
