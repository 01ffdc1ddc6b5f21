"""Faults at the engine level, caused for real against a real ``vllm serve`` (issue 8): a trainer process SIGKILLed
in the middle of a push, and an engine that presents a wrong token.

One server serves the module, with tensor parallel size 2: after a trainer dies mid-update, both workers of the
engine must end up in step (vLLM closes the update session only on a worker whose update raised, and the backend
raises from one worker only; engines/vllm.py closes the other's abandoned session when the next trainer joins).
The rule under test: an engine never serves a model that is half old and half new. Reference tokens come from
transformers on the weights the engine must hold.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

import fault_roles  # noqa: E402
from models import build_model, hf_greedy, perturb, prompts, save_model  # noqa: E402
from procs import outcomes, run_roles  # noqa: E402
from vllm_engines import running_server, in_process_llm, llm_greedy  # noqa: E402

from trainer_sync import RendezvousRefused, SyncConfig, SyncError, WeightSync  # noqa: E402
from trainer_sync.engines.clients import HttpClient  # noqa: E402

pytestmark = pytest.mark.vllm
N = 8
TIMEOUT_S = 8.0  # the dying trainer's SyncConfig.timeout_s: the engine must give up on it within this


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(str(tmp_path_factory.mktemp("tiny-qwen3-faults")))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory, "serve-faults", tensor_parallel_size=2) as srv:
        yield srv


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
    served, version = server.greedy(ps, N), get(server, "/weight_info")["weight_version"]
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
    assert get(server, "/weight_info")["weight_version"] == version
    assert server.greedy(ps, N) == served


def test_wrong_token_beside_an_honest_engine_names_the_wrong_one(server, model_dir):
    ps = list(prompts().values())
    served, version = server.greedy(ps, N), get(server, "/weight_info")["weight_version"]
    with in_process_llm(model_dir) as llm:
        before, llm_version = llm_greedy(llm, ps, N), llm.get_weight_version()
        with pytest.raises(SyncError) as err:
            WeightSync(build_model(seed=1), [llm, WrongTokenClient(server.url, 30.0, 1)], SyncConfig(timeout_s=5))
        assert llm_greedy(llm, ps, N) == before and llm.get_weight_version() == llm_version  # nothing applied
        assert server.greedy(ps, N) == served and get(server, "/weight_info")["weight_version"] == version
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
    assert get(server, "/weight_info")["weight_version"] == "1"
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
    assert get(server, "/weight_info")["weight_version"] == "3"
    assert get(server, "/is_paused")["is_paused"] is False
    assert server.greedy(list(ps.values()), N) == [hf_greedy(model, p, N) for p in ps.values()]
