"""Errors carry the members they name as data (issue 15): WeightSync names engines from lists, not from text."""
from __future__ import annotations

import pickle

from trainer_sync import HandshakeMismatch, RendezvousRefused, SyncError, WeightSync
from trainer_sync.protocol.messages import Verdict


def _sync_with(engines: dict[str, int]) -> WeightSync:
    """A WeightSync that only knows which receiver rank belongs to which engine (no engines, no group)."""
    ws = object.__new__(WeightSync)
    ws.receiver_names, ws.receiver_engines = [], []
    for name, n in engines.items():
        ws.receiver_names += [f"{name} worker {w}" for w in range(n)]
        ws.receiver_engines += [name] * n
    return ws


def test_sync_error_members_default_to_who_and_survive_pickling():
    e = SyncError("x", "transfer", "receiver 1")
    assert e.members == ["receiver 1"] and e.receivers == [] and e.dead == []
    e = SyncError("x", "rendezvous", "engine 0 (a), engine 2 (b)", members=["engine 0 (a)", "engine 2 (b)"],
                  dead=["engine 2 (b)"])
    assert e.members == ["engine 0 (a)", "engine 2 (b)"] and e.dead == ["engine 2 (b)"]
    r = RendezvousRefused("refused receiver 3: wrong token", stage="rendezvous", who="receiver 3", receivers=[3])
    assert isinstance(r, PermissionError) and r.receivers == [3]


def test_refused_handshake_names_engines_from_receiver_ranks():
    ws = _sync_with({"engine 0 (in-process LLM)": 1, "engine 1 (http://h:8000)": 2})
    err = HandshakeMismatch(["receiver 2: w missing", "trainer rank 0: v holds NaN or Inf"], receivers=[2])
    out = ws._name_engines(err)
    assert out.who == "engine 1 (http://h:8000)"
    assert "(refused by receiver 2 = engine 1 (http://h:8000) worker 1)" in str(out)
    assert ws._name_engines(HandshakeMismatch(["trainer rank 0: v holds NaN or Inf"])).who == ""


def test_verdicts_are_dataclasses_that_raise_with_their_members():
    v = Verdict("trainer_sync push failed: ...", "transfer", "engine 1 (x)", members=["engine 1 (x)"],
                dead=["engine 1 (x)"])
    assert v.failed and not Verdict().failed and pickle.loads(pickle.dumps(v)) == v
    try:
        WeightSync._raise(v)
    except SyncError as e:
        assert (e.stage, e.who, e.members, e.dead) == ("transfer", "engine 1 (x)", ["engine 1 (x)"], ["engine 1 (x)"])
    else:
        raise AssertionError("no error raised")
    WeightSync._raise(Verdict())  # no error: nothing raised
