"""What an engine serves, as the trainer_sync backend announces it when a trainer joins (``Keys.served_version``).

vLLM 0.26 keeps no weight version of its own: without the announcement a new trainer could not tell which version
an engine serves, and its count would start again at 1. The announcement is the version of the last push the
engine's workers applied whole (engines/vllm/backend.py ``served_version``); the trainer believes vLLM's own
version where the release keeps one and the announcement otherwise (engines/vllm/compat.py ``served_version``).
Here, on a real engine: the announcement equals what was applied, a refused or failed push leaves it where it was,
and a trainer that gets no weight version from vLLM (as on 0.26) continues the count from the announcement alone.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import build_model, train_step
from tests.helpers.vllm_engines import llm_worker, served_version
from tests.helpers.worker_extension import METHOD

from trainer_sync import HandshakeMismatch, SyncConfig, SyncError, WeightSync
from trainer_sync.engines.clients import LlmClient
from trainer_sync.engines.vllm import compat
from trainer_sync.protocol.messages import Keys, ServedVersion

pytestmark = pytest.mark.vllm
ENGINE = "engine 0 (in-process LLM)"


def announced(sync: WeightSync, receiver: int = 0) -> int | None:
    """What receiver ``receiver``'s worker announced when ``sync`` joined it."""
    return ServedVersion.from_json(sync.sender.bridge.store.get(Keys.served_version(receiver))).version


def backend_versions(llm) -> list:
    """What each worker's backend remembers applying, asked of the backend itself (not through vLLM's version)."""
    return llm.collective_rpc(METHOD)


class NoWeightVersionClient(LlmClient):
    """An in-process engine as a trainer sees one on vLLM 0.26, which keeps no weight version (the call is absent
    there): what the trainer knows of the engine's version comes from the backend's announcement alone."""

    def weight_version(self) -> str | None:
        return None


def test_a_new_trainer_is_told_the_version_the_engine_applied(llm):
    model = build_model(seed=0)
    with WeightSync(model, [llm]) as sync:
        train_step(model, seed=1)
        sync.push(version=7)
        train_step(model, seed=2)
        assert sync.push().version == 8
    assert backend_versions(llm) == [8]
    if compat.API.has_weight_version:
        assert llm.get_weight_version() == "8"  # vLLM's own and the backend's agree
    with WeightSync(model, [llm]) as sync:
        assert announced(sync) == 8 and sync.engine_version == 8
        assert sync.weight_versions() == {ENGINE: "8"} and sync.membership()["engines"] == {ENGINE: "8"}
        assert sync.push().version == 9
    assert served_version(llm) == "9" and backend_versions(llm) == [9]


def test_a_refused_or_failed_push_leaves_the_announced_version(llm, monkeypatch):
    model = build_model(seed=0)
    with WeightSync(model, [llm]) as sync:
        sync.push(version=30)
    with WeightSync(build_model(seed=3, hidden=96), [llm]) as sync:  # refused by the handshake: nothing applied
        assert announced(sync) == 30
        with pytest.raises(HandshakeMismatch):
            sync.push(version=31)
    engine = llm_worker(llm).weight_transfer_engine
    real_apply, calls = engine.applier.apply, []

    def failing_apply(batch):  # fails after the first round was applied: the model is half version 32
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("injected apply failure")
        real_apply(batch)

    with WeightSync(model, [llm], SyncConfig(bucket_mb=0.05, timeout_s=6)) as sync:
        assert announced(sync) == 30
        monkeypatch.setattr(engine.applier, "apply", failing_apply)
        with pytest.raises(SyncError, match="injected apply failure"):
            sync.push(version=32)
        monkeypatch.setattr(engine.applier, "apply", real_apply)
        assert backend_versions(llm) == [30]  # never announced as served
        assert sync.push(version=33).version == 33  # a new epoch: the announcement is still 30 when it joins
        assert announced(sync) == 30
    assert backend_versions(llm) == [33] and served_version(llm) == "33"


def test_without_a_vllm_weight_version_the_count_continues_from_the_announcement(llm):
    model = build_model(seed=0)
    with WeightSync(model, [llm]) as sync:
        sync.push(version=40)
    with WeightSync(model, [NoWeightVersionClient(llm)]) as sync:
        assert sync.engine_version == 40  # from the announcement: the client reports no version
        assert sync.weight_versions() == {ENGINE: "40"}  # before this trainer pushed anything
        train_step(model, seed=4)
        assert sync.push().version == 41
        assert sync.weight_versions() == {ENGINE: "41"}
    assert backend_versions(llm) == [41]
