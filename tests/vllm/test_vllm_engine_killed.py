"""An engine SIGKILLed in the middle of a transfer, with a second engine that survives (issues 8 and 7).

Engines: an in-process ``vllm.LLM`` (the survivor) and a ``vllm serve`` process (the victim, its own module-scoped
server since the test kills it). The victim is killed from inside the survivor's receive, when the survivor applies
its third batch of version 2: at that moment both engines are mid-transfer (they receive the same broadcast buckets,
many small ones), so the kill lands during the transfer every time, with no timing guesswork.

Expected (sync.py): the trainer raises a SyncError naming the dead engine and the stage within the timeout, the
survivor gets version 2 whole (pushed again to it alone on a new group) and serves it, and training goes on: the
next push succeeds with the survivor only.
"""
from __future__ import annotations

import os
import signal
import time
import warnings

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import build_model, hf_reference, prompts, train_step
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, llm_worker, served_version

from trainer_sync import SyncConfig, SyncError, WeightSync

pytestmark = pytest.mark.vllm
N = 8
TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def victim(one_worker_server):
    """The engine this module SIGKILLs (tests/vllm/conftest.py starts it; nothing after this module uses it)."""
    return one_worker_server


def test_engine_killed_mid_transfer_is_named_and_the_survivor_serves_the_push(model_dir, victim, monkeypatch):
    ps = list(prompts().values())
    model = build_model(seed=0)
    with in_process_llm(model_dir) as llm:
        survivor = llm_worker(llm).weight_transfer_engine
        core = llm.llm_engine.engine_core.engine_core
        dead_name = f"engine 1 ({victim.url})"
        with WeightSync(model, [llm, victim.url], SyncConfig(timeout_s=TIMEOUT_S, bucket_mb=0.004)) as sync:
            train_step(model, seed=300)
            first = sync.push()
            assert first.num_receivers == 2 and first.num_buckets > 10
            assert llm_greedy(llm, ps, N) == victim.greedy(ps, N) == hf_reference(model, N)

            train_step(model, seed=301)
            real_apply, batches, killed = survivor.applier.apply, [], {}

            def apply_and_kill(batch):
                batches.append(len(batch))
                if len(batches) == 3 and not killed:
                    os.killpg(victim.proc.pid, signal.SIGKILL)  # the server and its engine process, no goodbye
                    killed["at"] = time.monotonic()
                real_apply(batch)

            monkeypatch.setattr(survivor.applier, "apply", apply_and_kill)
            t0 = time.monotonic()
            with warnings.catch_warnings(record=True) as caught, pytest.raises(SyncError) as err:
                warnings.simplefilter("always")
                sync.push()
            elapsed = time.monotonic() - killed["at"]
            monkeypatch.setattr(survivor.applier, "apply", real_apply)
            print(f"SyncError {elapsed:.2f}s after the kill ({time.monotonic() - t0:.2f}s push): {err.value}")

            assert victim.proc.wait(10) == -signal.SIGKILL
            e = err.value
            assert e.stage == "transfer" and e.who == dead_name, (e.stage, e.who, str(e))
            assert dead_name in str(e) and "engine 0" not in e.who
            # Within the timeout (plus the push again to the survivor): the trainer fails at once on the reset
            # connection, the survivor's receive only at its own bucket deadline (TIMEOUT_S), because aborting a
            # gloo group does not close its connections in torch 2.13 (they close when the group is freed).
            assert elapsed < TIMEOUT_S + 5, elapsed
            assert any(dead_name in str(w.message) for w in caught), [str(w.message) for w in caught]

            # The survivor got version 2 whole and serves it.
            assert served_version(llm) == "2" and not core.is_scheduler_paused()
            want = hf_reference(model, N)
            assert llm_greedy(llm, ps, N) == want
            assert sync.membership()["engines"] == {"engine 0 (in-process LLM)": "2"}

            # Training goes on: the next push succeeds with the survivor only.
            train_step(model, seed=302)
            report = sync.push()
            assert report.version == 3 and report.num_receivers == 1
            assert served_version(llm) == "3"
            assert llm_greedy(llm, ps, N) == hf_reference(model, N) != want
