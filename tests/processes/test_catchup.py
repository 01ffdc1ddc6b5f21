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
