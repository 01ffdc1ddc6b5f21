"""Dynamic membership with real engines (issue 7): an engine that joins after three pushes catches up point to point
and serves exactly what an engine that saw every push serves; an engine that dies between pushes is dropped (with a
warning naming it) and the next push succeeds for the rest.

Engines: an in-process LLM that sees every push, and a `vllm serve` process (TP 1) that joins late and is killed
at the end. Weights are compared through the engines themselves: greedy tokens, and the top-5 tokens and their
logprobs at every generated position (to float32 rounding: the engines run in processes with different thread
counts). That the pulled bytes equal the kept version bit for bit is tested without engines in
tests/processes/test_catchup.py.
"""
from __future__ import annotations

import json
import os
import signal
import urllib.request
import warnings

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import build_model, hf_reference, prompts, train_step
from tests.helpers.vllm_engines import in_process_llm

from trainer_sync import SyncConfig, WeightSync

pytestmark = pytest.mark.vllm
N = 6


@pytest.fixture(scope="module")
def late_server(one_worker_server):
    """The engine that joins the running job (tests/vllm/conftest.py starts it)."""
    return one_worker_server


def llm_tokens_and_logprobs(llm, prompt, n):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                                      logprobs=5), use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [{int(k): v.logprob for k, v in pos.items()} for pos in out.logprobs]


def server_tokens_and_logprobs(server, prompt, n):
    body = {"model": server.model_dir, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 5, "return_tokens_as_token_ids": True}
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        choice = json.load(resp)["choices"][0]
    # the server reports top logprobs keyed by token text; without a tokenizer that text is "token_id:<id>"
    top = [{int(k.split(":")[-1]) if ":" in k else k: v for k, v in pos.items()}
           for pos in choice["logprobs"]["top_logprobs"]]
    return choice["token_ids"], top


def test_late_engine_catches_up_then_joins_and_a_dead_engine_is_dropped(model_dir, late_server):
    ps = list(prompts().values())
    model = build_model(seed=0)
    with in_process_llm(model_dir) as llm, \
            WeightSync(model, [llm], SyncConfig(keep_latest=True, timeout_s=60)) as sync:
        for step in range(3):
            train_step(model, seed=200 + step)
            sync.push()
        # a fourth training step the engines have not seen: the joiner must get version 3, not the live weights
        snapshot_ref = hf_reference(model, N)
        train_step(model, seed=299)

        name = sync.add_engine(late_server.url)
        m = sync.membership()
        assert m["joining"] == {name: "3"} and list(m["engines"].values()) == ["3"]
        for p, want in zip(ps, snapshot_ref):
            tokens, top = server_tokens_and_logprobs(late_server, p, N)
            ref_tokens, ref_top = llm_tokens_and_logprobs(llm, p, N)
            assert tokens == ref_tokens == want
            # same top-5 tokens, logprobs equal to float32 rounding (the two engine processes use different thread
            # counts, so sums run in another order); weights bit for bit are proven in tests/processes/test_catchup.py
            assert [sorted(d) for d in top] == [sorted(d) for d in ref_top]
            for d, ref in zip(top, ref_top):
                assert all(abs(d[k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])) for k in ref)

        # next push: the joiner is in the broadcast membership (a new epoch)
        epoch = m["epoch"]
        report = sync.push()
        m = sync.membership()
        assert report.version == 4 and m["epoch"] == epoch + 1
        assert m["engines"] == {"engine 0 (in-process LLM)": "4", name: "4"} and m["joining"] == {}
        want = hf_reference(model, N)
        assert late_server.greedy(ps, N) == want
        assert [llm_tokens_and_logprobs(llm, p, N)[0] for p in ps] == want

        # the late engine dies between pushes: dropped with a warning naming it, the push succeeds for the rest
        os.killpg(late_server.proc.pid, signal.SIGKILL)
        late_server.proc.wait()
        train_step(model, seed=300)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = sync.push()
        assert report.version == 5
        assert any(name in str(w.message) and "dropping" in str(w.message) for w in caught)
        assert sync.membership()["engines"] == {"engine 0 (in-process LLM)": "5"}
        assert [llm_tokens_and_logprobs(llm, p, N)[0] for p in ps] == hf_reference(model, N)
