"""Core data path: awkward tensors, handshake mismatches, refused peers, missing peers, epochs, memory budget."""
import torch

from tests.helpers import roles
from tests.helpers.cluster import free_port, outcomes, run_roles


def test_awkward_tensors_arrive_bit_for_bit_and_tied_weight_once():
    port = free_port()
    expected = None
    res = run_roles([("trainer", 0, 1, roles.odd_trainer, (1, port)),
                     ("receiver", 0, 1, roles.collect_receiver, (1, port, 1, expected))])
    want, report = res[("trainer", 0)]
    (version, got), = res[("receiver", 0)]
    assert version == 1
    # the tied head.weight travels once, under the embedding's name
    assert "head.weight" not in got and "head.weight" not in want
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    assert report["num_buckets"] >= 3


def test_tied_alias_is_delivered_when_the_receiver_expects_it():
    port = free_port()
    model = roles.Odd()
    expected = {n: (tuple(p.shape), None) for n, p in model.named_parameters(remove_duplicate=False)}
    assert "head.weight" in expected
    res = run_roles([("trainer", 0, 1, roles.odd_trainer, (1, port)),
                     ("receiver", 0, 1, roles.collect_receiver, (1, port, 1, expected))])
    (_, got), = res[("receiver", 0)]
    assert torch.equal(got["head.weight"], got["embed.weight"]) and set(got) == set(expected)


def test_mismatch_fails_on_every_rank_with_one_list_and_nothing_applied():
    port = free_port()
    model = roles.mlp()
    expected = {n: (tuple(p.shape), "float32") for n, p in model.named_parameters()}
    expected["2.weight"] = ((41, 40), "float32")  # wrong shape
    expected["4.bias"] = ((8,), "int64")  # wrong dtype
    del expected["0.bias"]  # -> unexpected
    expected["extra.weight"] = ((3,), "float32")  # -> missing
    res = run_roles([("trainer", r, 2, roles.mismatched_trainer, (1, port)) for r in range(2)]
                    + [("receiver", 0, 1, roles.refusing_receiver, (2, port, expected))])
    for r in range(2):
        errs = res[("trainer", r)]
        assert errs is not None and len(errs) == 4, errs
        text = "\n".join(errs)
        for needle in ("wrong shape for 2.weight", "wrong dtype for 4.bias", "unexpected 0.bias",
                       "missing extra.weight"):
            assert needle in text
    err, applied = res[("receiver", 0)]
    assert err and "wrong shape for 2.weight" in err and applied == 0


def test_wrong_token_is_refused_by_name():
    port = free_port()
    out = outcomes([("trainer", 0, 1, roles.connect_only_trainer, (2, port)),
                    ("receiver", 0, 2, roles.connect_only_receiver, (1, port)),
                    ("receiver", 1, 2, roles.connect_only_receiver, (1, port, "not-the-token"))])
    kind, msg = out[("receiver", 1)][1]
    assert kind == "RendezvousRefused" and "wrong token" in msg
    kind, msg = out[("trainer", 0)][1]
    assert kind == "RendezvousRefused" and "receiver 1" in msg and "not-the-token" not in msg
    assert out[("receiver", 0)][1][0] != "ok"  # the group never formed, so the honest receiver fails too


def test_missing_receiver_fails_within_timeout_naming_it():
    port = free_port()
    import time

    t = time.monotonic()
    out = outcomes([("trainer", 0, 1, roles.connect_only_trainer, (2, port, "tok", 3.0)),
                    ("receiver", 0, 2, roles.connect_only_receiver, (1, port, "tok", 3.0))])
    kind, msg = out[("trainer", 0)][1]
    assert kind == "SyncError" and "receiver 1" in msg and "receiver 0" not in msg.split("epoch 0)")[1]
    assert out[("receiver", 0)][1][0] == "SyncError"
    assert time.monotonic() - t < 40


def test_twenty_epochs_of_create_and_destroy():
    port = free_port()
    res = run_roles([("trainer", 0, 1, roles.epochs_trainer, (2, port, 20))]
                    + [("receiver", j, 2, roles.epochs_receiver, (1, port, 20)) for j in range(2)], timeout=240)
    for j in range(2):
        assert res[("receiver", j)] == [float(e) for e in range(20)]


def test_memory_budget_falls_back_and_says_so():
    port = free_port()
    # the largest piece is `big` (12000 B). 64 KiB buckets x 2 buffers do not fit 30000 B: buckets shrink to
    # 15000 B. 20000 B cannot hold two copies of `big`: one buffer, no overlap.
    for budget_mb, word in ((30000 / 2**20, "shrunk"), (20000 / 2**20, "one buffer")):
        cfg = {"memory_budget_mb": budget_mb, "bucket_mb": 0.0625}
        res = run_roles([("trainer", 0, 1, roles.odd_trainer, (1, port, cfg)),
                         ("receiver", 0, 1, roles.collect_receiver, (1, port, 1))])
        want, report = res[("trainer", 0)]
        (_, got), = res[("receiver", 0)]
        assert word in report["fallback"]
        assert all(torch.equal(got[n], t) for n, t in want.items())
        port = free_port()
