"""Delta pushes, the pure part (trainer_sync/delta_policy.py, the receiver's delta destination, the settings):
which push may go as deltas and why not, the bucket geometry both sides agree on, and bad input refused clearly."""
import dataclasses

import pytest
import torch

from trainer_sync import SyncConfig
from trainer_sync.codec import delta as D
from trainer_sync.plan.delta_policy import DeltaDecision, bucket_word, delta_allowed, padding_ranges, plan_digest
from trainer_sync.protocol.delta import DeltaState
from trainer_sync.codec.delta.destination import DeltaDestination
from trainer_sync.plan.buckets import Bucket, BucketPlan, Slot, WireTensor

DIGEST = plan_digest("{}")


def held(version, ok=True, digest=DIGEST, why=""):
    return DeltaState(digest, version, ok, why)


def test_delta_when_every_receiver_holds_the_base():
    d = delta_allowed("auto", False, 5, DIGEST, [held(5), held(5)])
    assert d == DeltaDecision(True, 5, None)
    assert DeltaDecision.from_json(d.to_json()) == d


@pytest.mark.parametrize("mode, ipc, base, receivers, reason", [
    ("off", False, 5, [held(5)], "delta off (SyncConfig.delta)"),
    ("auto", True, 5, [held(5)], "CUDA IPC push (same-GPU copies always go full)"),
    ("auto", False, 0, [held(None)], "first push (no base version yet)"),
    ("auto", False, 5, [held(5), None], "receiver 1 holds no version (joined late or restarted)"),
    ("auto", False, 5, [held(None)], "receiver 0 holds no version (joined late or restarted)"),
    ("auto", False, 5, [held(4)], "receiver 0 holds version 4, not the base version 5 (it missed a push)"),
    ("auto", False, 5, [held(5, ok=False, why="mirror too big")], "receiver 0 cannot apply deltas (mirror too big)"),
    ("auto", False, 5, [held(5, digest="x")], "receiver 0 holds version 5 of another plan"),
])
def test_full_push_and_why(mode, ipc, base, receivers, reason):
    d = delta_allowed(mode, ipc, base, DIGEST, receivers)
    assert not d.on and reason in d.reason


def test_every_problem_is_named():
    d = delta_allowed("auto", False, 3, DIGEST, [held(3), held(2), None])
    assert d.reason == ("receiver 1 holds version 2, not the base version 3 (it missed a push); "
                        "receiver 2 holds no version (joined late or restarted)")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="SyncConfig.delta must be"):
        delta_allowed("sometimes", False, 1, DIGEST, [])
    with pytest.raises(ValueError, match="SyncConfig.delta must be auto or off"):
        SyncConfig(delta="on")
    with pytest.raises(ValueError, match="delta_cache_mb"):
        SyncConfig(delta_cache_mb=-1)
    assert SyncConfig().delta == "auto"


def test_padding_and_word():
    b = Bucket(0, 0, 0, 1024, (Slot("a", 0, 10, 0), Slot("b", 0, 3, 256), Slot("c", 0, 5, 512)))
    sizes = {"a": 2, "b": 1, "c": 4}
    assert padding_ranges(b, sizes) == [(20, 256), (259, 512), (532, 1024)]
    assert bucket_word(b, sizes) == 1  # b: 3 bytes, not a whole number of 2-byte words
    assert bucket_word(b, {"a": 2, "b": 2, "c": 4}) == 2


def plan():
    t = {"w": WireTensor("w", (4, 8), "bfloat16", ("tied",)), "v": WireTensor("v", (5,), "float32")}
    return BucketPlan(t, (Bucket(0, 0, 0, 512, (Slot("w", 0, 32, 0), Slot("v", 0, 5, 256))),), 1, 1024)


def test_targets_bind_by_name_or_alias():
    targets = {"tied": torch.zeros(4, 8, dtype=torch.bfloat16), "v": torch.zeros(5)}
    dr = DeltaDestination("auto", None, targets, torch.device("cpu"))
    p = plan()
    dr.prepare(p, p.to_json())
    assert dr.dest["w"].data_ptr() == targets["tied"].data_ptr()
    assert dr.state() == DeltaState(plan_digest(p.to_json()), None, True, "")


@pytest.mark.parametrize("targets, message", [
    ({"w": torch.zeros(4, 8), "v": torch.zeros(5)}, "target w is [4, 8] float32, the trainer sends [4, 8] bfloat16"),
    ({"w": torch.zeros(4, 8, dtype=torch.bfloat16)}, "no target for v"),
    ({"w": torch.zeros(4, 8, dtype=torch.bfloat16), "v": torch.zeros(5), "x": torch.zeros(1)},
     "targets the trainer does not send: ['x']"),
    ({"w": torch.zeros(3, 8, dtype=torch.bfloat16), "v": torch.zeros(5)}, "target w is [3, 8] bfloat16"),
])
def test_bad_targets_are_refused_naming_the_tensor(targets, message):
    dr = DeltaDestination("auto", None, targets, torch.device("cpu"))
    p = plan()
    with pytest.raises(D.DeltaError, match="Receiver targets do not match") as e:
        dr.prepare(p, p.to_json())
    assert message in str(e.value)


def test_targets_must_be_tensors_and_contiguous():
    with pytest.raises(TypeError, match="dict of tensor name"):
        DeltaDestination("auto", None, {"w": [1, 2]}, torch.device("cpu"))
    with pytest.raises(ValueError, match="contiguous"):
        DeltaDestination("auto", None, {"w": torch.zeros(8, 4).t()}, torch.device("cpu"))


def test_mirror_over_its_cap_takes_full_pushes():
    dr = DeltaDestination("auto", 50, None, torch.device("cpu"))  # the plan needs 64 + 20 bytes
    p = plan()
    dr.prepare(p, p.to_json())
    st = dr.state()
    assert dr.dest is None and not st.ok and "over delta_mirror_mb" in st.why
    assert "cannot apply deltas" in delta_allowed("auto", False, 1, st.digest,
                                                  [dataclasses.replace(st, version=1)]).reason


def test_sender_cache_zeroes_padding_advances_in_place_and_keeps_only_acknowledged_versions():
    from trainer_sync.codec.delta.cache import DeltaSendState

    p = plan()
    b = p.buckets[0]
    ds = DeltaSendState("auto", None)
    ds.begin(p.to_json(), p)
    assert ds.pads(b) == [(64, 256), (276, 512)] and ds.word(b) == 2
    g = torch.Generator().manual_seed(0)
    v1 = torch.randint(0, 256, (512,), dtype=torch.uint8, generator=g)  # garbage in the padding too
    ds.keep(b, v1)
    assert ds.cache.base(0, 512, 1) is None  # not acknowledged yet
    ds.commit(1)
    data, sums = ds.cache.base(0, 512, 1)
    assert not data[64:256].any() and not data[276:].any() and torch.equal(data[:64], v1[:64])
    assert sums == D.sums(data)
    v2 = data.clone()
    v2[:64:5] += 1
    enc, st = D.encode(data, v2, word=2, base=sums)
    ds.advance(b, enc, st)
    assert torch.equal(ds.cache.entries[0].data, v2) and ds.cache.entries[0].sums == D.sums(v2)
    assert ds.cache.base(0, 512, 1) is None  # overwritten by a push not yet acknowledged
    ds.abandon()  # that push failed: the bucket has no base any more (it goes full next time)
    assert 0 not in ds.cache.entries


def test_senders_cache_only_when_every_receiver_can_take_deltas():
    assert delta_allowed("auto", False, 0, DIGEST, [held(None), held(None)]).keep  # the first push: cache it
    assert not delta_allowed("auto", False, 0, DIGEST, [held(None), held(None, ok=False)]).keep
    assert not delta_allowed("auto", False, 3, DIGEST, [held(3), None]).keep
    assert delta_allowed("auto", False, 3, DIGEST, [held(2), held(3)]).keep  # missed a push: full, then deltas
    assert not delta_allowed("off", False, 3, DIGEST, [held(3)]).keep
    assert not delta_allowed("auto", True, 3, DIGEST, [held(3)]).keep


def test_a_receivers_own_reason_comes_first():
    """A receiver that holds no version because it cannot take deltas yet says why, not "joined late"."""
    waiting = DeltaState(DIGEST, None, True, "it has no delta targets yet")
    d = delta_allowed("auto", False, 3, DIGEST, [held(3), waiting])
    assert d.reason == "receiver 1 cannot apply deltas (it has no delta targets yet)" and d.keep


def test_receiver_adopting_targets_at_run_time():
    """No targets: full pushes, hopeful (the trainer caches); adopted: deltas into them from the version they hold;
    dropped: full again, for good or not; a late state is marked so that the trainer reads it again."""
    p = plan()
    dr = DeltaDestination("auto", None, None, torch.device("cpu"), adopts_targets=True)
    st = dr.state()
    assert st.late and st.ok and st.version is None and "no delta targets yet" in st.why
    dr.prepare(p, p.to_json())
    dr.finished(1)
    assert dr.dest is None and dr.state().version is None  # no mirror was made
    targets = {"tied": torch.zeros(4, 8, dtype=torch.bfloat16), "v": torch.zeros(5)}
    assert dr.adopt_targets(targets, 1) and not dr.adopt_targets(targets, 1)  # the second: no change
    assert dr.state() == DeltaState(plan_digest(p.to_json()), 1, True, "", late=True)
    assert dr.dest["w"].data_ptr() == targets["tied"].data_ptr()
    assert delta_allowed("auto", False, 1, plan_digest(p.to_json()), [dr.state()]).on
    assert dr.drop_targets("its fast path is not armed") and dr.dest is None
    st = dr.state()
    assert st.ok and st.version is None
    assert "cannot apply deltas (its fast path is not armed)" in delta_allowed("auto", False, 1, st.digest,
                                                                                [st]).reason
    dr.drop_targets("TP shards", for_good=True)
    assert not dr.state().ok  # the trainer stops caching its pushes
    bad = {"tied": torch.zeros(4, 8), "v": torch.zeros(5)}  # float32 where bfloat16 is sent: not adopted
    dr.adopt_targets(bad, 1)
    st = dr.state()
    assert dr.targets is None and not st.ok and "target tied is [4, 8] float32" in st.why
    with pytest.raises(ValueError, match="adopts_targets"):
        DeltaDestination("auto", None, None, torch.device("cpu")).adopt_targets(targets, 1)
