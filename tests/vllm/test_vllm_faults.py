"""Faults at the engine level, caused for real against a real ``vllm serve`` (issue 8): a trainer process SIGKILLed
in the middle of a push, and an engine that presents a wrong token; and (issue 14) engine ownership: joins refused
while another trainer holds the engine, versions that never go backwards, unreachable engines at construction, an
update that failed before touching any weight.

One server serves the module, with tensor parallel size 2: after a trainer dies mid-update, both workers of the
engine must end up in step (vLLM closes the update session only on a worker whose update raised, and the backend
raises from one worker only; the other's abandoned session is announced when the next trainer joins, and that trainer
closes it: engines/vllm/backend.py ``_join``, control/membership.py ``_close_abandoned_sessions``).
The rule under test: an engine never serves a model that is half old and half new. Reference tokens come from
transformers on the weights the engine must hold.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

from tests.helpers import fault_roles
from tests.helpers.models import build_model, hf_greedy, hf_reference, perturb, prompts
from tests.helpers.cluster import free_port, outcomes, run_roles
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, served_version

from trainer_sync import RendezvousRefused, SyncConfig, SyncError, WeightSync
from trainer_sync.engines.clients import HttpClient

pytestmark = pytest.mark.vllm
N = 8
TIMEOUT_S = 8.0  # the dying trainer's SyncConfig.timeout_s: the engine must give up on it within this


def get(server, route: str, timeout_s: float = 60) -> dict:
    with urllib.request.urlopen(server.url + route, timeout=timeout_s) as resp:
        return json.load(resp)


def completion(server, prompt: list[int], n: int, timeout_s: float = 180) -> list[int]:
    body = {"model": server.model_dir, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.load(resp)["choices"][0]["token_ids"]


class WrongTokenClient(HttpClient):
    """A ``vllm serve`` engine handed join info with a token that is not the trainer's."""

    def init(self, join_info: dict) -> None:
        super().init({**join_info, "token": "not-the-token"})


def test_engine_with_wrong_token_is_refused_before_joining_and_nothing_is_applied(server):
    ps = list(prompts().values())
    served, version = server.greedy(ps, N), served_version(server)
    model = build_model(seed=0)
    perturb(model, seed=91)
    t = time.monotonic()
    with pytest.raises(SyncError) as err:
        WeightSync(model, [WrongTokenClient(server.url, 30.0)], SyncConfig(token="the-real-token", timeout_s=10))
    print(f"refused after {time.monotonic() - t:.2f}s: {err.value}")
    assert time.monotonic() - t < 10 + 30
    e = err.value
    assert e.stage == "rendezvous" and e.who == f"engine 0 ({server.url})", (e.stage, e.who)
    text = str(e)
    assert "wrong token" in text and "refused" in text, text
    assert "the-real-token" not in text and "not-the-token" not in text  # no token in any message
    assert isinstance(e.__cause__, RendezvousRefused) and "receiver 0" in str(e.__cause__)  # the trainer's verdict
    # Refused at the rendezvous: no group was formed, no push began, the engine was never paused.
    assert get(server, "/is_paused")["is_paused"] is False
    assert served_version(server) == version
    assert server.greedy(ps, N) == served


def test_wrong_token_beside_an_honest_engine_names_the_wrong_one(server, model_dir):
    ps = list(prompts().values())
    served, version = server.greedy(ps, N), served_version(server)
    with in_process_llm(model_dir) as llm:
        before, llm_version = llm_greedy(llm, ps, N), served_version(llm)
        with pytest.raises(SyncError) as err:
            WeightSync(build_model(seed=1), [llm, WrongTokenClient(server.url, 30.0, 1)], SyncConfig(timeout_s=5))
        assert llm_greedy(llm, ps, N) == before and served_version(llm) == llm_version  # nothing applied
        assert server.greedy(ps, N) == served and served_version(server) == version
        assert isinstance(err.value.__cause__, RendezvousRefused) and "receiver 1" in str(err.value.__cause__)
        assert err.value.who == f"engine 1 ({server.url})", err.value.who


def test_trainer_killed_mid_push_engine_aborts_stays_paused_and_next_push_restores(server, tmp_path):
    ps = prompts()
    stamp = str(tmp_path / "killed.json")
    # Version 1 goes whole; the trainer dies packing the 12th of 24 tensors of version 2.
    out = outcomes([("trainer", 0, 1, fault_roles.dying_trainer, (server.url, TIMEOUT_S, 12, stamp, (81, 82)))],
                   timeout=240)
    status, detail = out[("trainer", 0)]
    assert status == "error" and "exit code -9" in detail, detail
    with open(stamp) as f:
        killed_at = json.load(f)["killed_at"]

    # The engine's update aborts within the trainer's timeout: until it does, the engine core is inside
    # update_weights and answers no other call.
    assert served_version(server) == "1"
    aborted_after = time.time() - killed_at
    print(f"engine answered {aborted_after:.2f}s after the trainer died")
    assert aborted_after < TIMEOUT_S + 5, aborted_after
    assert get(server, "/is_paused")["is_paused"] is True  # left paused: its model may be half version 2

    # A request sent now must not be answered from the mixed weights: it waits.
    held: dict = {}
    waiting = threading.Thread(target=lambda: held.update(tokens=completion(server, ps["short"], N)), daemon=True)
    waiting.start()
    waiting.join(5)
    assert waiting.is_alive(), f"the engine answered from a half-updated model: {held}"

    # A new trainer process pushes complete weights: service is back, on exactly those weights.
    new = run_roles([("trainer", 0, 1, fault_roles.fresh_trainer, (server.url, 60.0, 83, 3))],
                    timeout=240)[("trainer", 0)]
    assert new["report"]["version"] == 3 and new["versions"] == {f"engine 0 ({server.url})": "3"}
    model = fault_roles.model_from_state(new["state"])
    waiting.join(60)
    assert not waiting.is_alive()
    assert held["tokens"] == hf_greedy(model, ps["short"], N)  # the held request ran on the new weights only
    assert served_version(server) == "3"
    assert get(server, "/is_paused")["is_paused"] is False
    assert server.greedy(list(ps.values()), N) == hf_reference(model, N)


# --- issue 14: one owner per engine; refused joins and errors that touched no weight disturb nothing -------------

def post(server, route: str, body: dict | None = None, timeout_s: float = 60) -> dict:
    req = urllib.request.Request(server.url + route, json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.load(resp)


def test_refused_joins_leave_the_owner_working_and_the_engine_serving(server):
    """Joins refused while trainer A holds the engine: a join naming A's rendezvous with a wrong token, and
    another trainer's join. Neither drops A's receiver nor pauses the engine; A's next push works on its group."""
    ps = list(prompts().values())
    model = build_model(seed=0)
    with WeightSync(model, [server.url], SyncConfig(token="owner-token", timeout_s=20)) as owner:
        perturb(model, seed=61)
        version = owner.push().version
        served = server.greedy(ps, N)
        assert served == hf_reference(model, N)

        # A join with the owner's rendezvous address but a wrong token, straight to the engine's route.
        forged = {**owner.sender.join_info(0, 2).to_dict(), "token": "not-the-token", "timeout_s": 2.0}
        with pytest.raises(urllib.error.HTTPError):
            post(server, "/init_weight_transfer_engine", {"init_info": forged})

        # Another trainer (its own rendezvous, its own valid token) while the owner is alive.
        t = time.monotonic()
        with pytest.raises(SyncError) as err:
            WeightSync(build_model(seed=1), [server.url], SyncConfig(token="intruder-token", timeout_s=20))
        took = time.monotonic() - t
        text = str(err.value)
        print(f"second trainer refused after {took:.2f}s: {text}")
        assert "held by another trainer" in text and err.value.stage == "rendezvous", text
        assert err.value.who == f"engine 0 ({server.url})", err.value.who
        assert took < 10, took  # at once, not after the rendezvous timeout (20 s)
        for secret in ("owner-token", "intruder-token", f":{owner.sender.rdzv.port}"):
            assert secret not in text  # neither token, nor where the owner's rendezvous is

        assert get(server, "/is_paused")["is_paused"] is False
        assert served_version(server) == str(version)
        assert server.greedy(ps, N) == served

        epoch = owner.sender.epoch
        perturb(model, seed=62)
        report = owner.push()  # on the owner's current group: nothing was dropped
        assert owner.sender.epoch == epoch and report.version == version + 1
        assert server.greedy(ps, N) == hf_reference(model, N)


def test_one_owner_at_a_time_and_versions_never_go_backwards(server):
    ps = list(prompts().values())
    a_model = build_model(seed=0)
    with WeightSync(a_model, [server.url], SyncConfig(timeout_s=30)) as a:
        for seed in (71, 72, 73):
            perturb(a_model, seed=seed)
            top = a.push().version
        # The owner re-joins (a new epoch, as after a failure or with more engines): still its engine.
        epoch, a.stale = a.sender.epoch, True
        perturb(a_model, seed=74)
        top = a.push().version
        assert a.sender.epoch == epoch + 1
        with pytest.raises(SyncError) as err:
            WeightSync(build_model(seed=1), [server.url], SyncConfig(timeout_s=30))
        assert "held by another trainer" in str(err.value), str(err.value)
        assert served_version(server) == str(top)
        assert server.greedy(ps, N) == hf_reference(a_model, N)

    # The owner closed: a new trainer takes the engine, and its version continues (never goes backwards).
    b_model = build_model(seed=0)
    perturb(b_model, seed=75)
    with WeightSync(b_model, [server.url], SyncConfig(timeout_s=30)) as b:
        report = b.push()
        assert report.version == top + 1, (report.version, top)
        assert served_version(server) == str(top + 1)
        assert server.greedy(ps, N) == hf_reference(b_model, N)

    # Going back only when asked for: an explicit version (a new job restarting its step count), with a warning.
    with WeightSync(b_model, [server.url], SyncConfig(timeout_s=30)) as c:
        with pytest.warns(UserWarning, match="goes back"):
            c.push(version=1)
        assert served_version(server) == "1"
        assert c.push().version == 2


def test_unreachable_engines_fail_the_construction_naming_each(server):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with pytest.raises(SyncError) as err:
        WeightSync(build_model(seed=0), [server.url, *dead], SyncConfig(timeout_s=20))
    text = str(err.value)
    print(text)
    assert "2 of 3 engine(s) cannot be reached" in text, text
    for i, url in enumerate(dead, start=1):
        assert f"engine {i} ({url}): get_world_size failed" in text and f"engine {i} ({url})" in err.value.who
    assert "Connection refused" in text and server.url not in text
    with pytest.raises(SyncError) as err:
        WeightSync(build_model(seed=0), [dead[0]], SyncConfig(timeout_s=20))
    assert f"engine 0 ({dead[0]}): get_world_size failed" in str(err.value), str(err.value)
    # The live engine was never joined (so it is free) and never paused.
    assert get(server, "/is_paused")["is_paused"] is False
    with WeightSync(build_model(seed=0), [server.url], SyncConfig(timeout_s=20)) as sync:
        sync.push()


def test_an_update_that_touched_no_weight_resumes_the_engine(server):
    """The engine is released between pushes (an operator's POST /shutdown_weight_transfer_engine; on releases
    without that route, before 0.32, the backend's leave message, as HttpClient.shutdown sends it): the trainer's
    next push fails before any weight is applied ("update_weights before init_weight_transfer_engine"), and the
    engine is resumed on its old weights instead of being left paused; the push after that re-joins and works."""
    ps = list(prompts().values())
    model = build_model(seed=0)
    with WeightSync(model, [server.url], SyncConfig(timeout_s=10)) as sync:
        perturb(model, seed=81)
        sync.push()
        served, version = server.greedy(ps, N), served_version(server)
        HttpClient(server.url).shutdown()
        perturb(model, seed=82)
        with pytest.raises(SyncError) as err:
            sync.push()
        assert "update_weights before init_weight_transfer_engine" in str(err.value), str(err.value)
        assert "the engine was resumed" in str(err.value)
        assert get(server, "/is_paused")["is_paused"] is False
        assert served_version(server) == version
        assert server.greedy(ps, N) == served
        report = sync.push()
        assert served_version(server) == str(report.version)
        assert server.greedy(ps, N) == hf_reference(model, N)
