"""WeightSync into a real ``vllm serve`` process over HTTP (VLLM_SERVER_DEV_MODE=1 routes), alone, from a 2-rank
FSDP2 trainer, and together with an in-process engine.

One server serves the whole module (it takes ~30 s to start on a small CPU box). It runs with tensor parallel
size 2, so every push also checks that both workers of a TP engine join as receivers and that each shards the full
checkpoint-format tensors it receives. Each test pushes before it asserts; the reference is transformers greedy
decoding on the trainer's weights.
"""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import build_model, hf_reference, perturb, prompts, train_step
from tests.helpers.cluster import run_roles
from tests.helpers.vllm_engines import fsdp_trainer, in_process_llm, llm_greedy, mismatched_trainer, served_version

from trainer_sync import HandshakeMismatch, SyncConfig, WeightSync

pytestmark = pytest.mark.vllm
N = 8


def test_http_push_serves_the_new_weights(server):
    ps = list(prompts().values())
    server.greedy(ps, N)  # the long prompt's KV blocks are now cached under the old weights
    model = build_model(seed=0)
    with WeightSync(model, [server.url]) as sync:
        for step in range(2):
            train_step(model, seed=100 + step)
            report = sync.push()
            assert report.version == step + 1 and report.num_receivers == 2  # both TP workers
            assert sync.weight_versions() == {f"engine 0 ({server.url})": str(step + 1)}
            assert server.greedy(ps, N) == hf_reference(model, N)


def test_http_mismatch_is_refused_and_server_keeps_serving(server):
    good = build_model(seed=0)
    perturb(good, seed=21)
    with WeightSync(good, [server.url], SyncConfig(pause_mode="abort")) as sync:
        sync.push(version=3)
    ps = list(prompts().values())
    served = server.greedy(ps, N)
    with WeightSync(build_model(seed=0, hidden=96), [server.url]) as sync:
        with pytest.raises(HandshakeMismatch) as err:
            sync.push(version=4)
        for j in range(2):  # every TP worker checks the plan
            assert f"receiver {j}: wrong shape for model.norm.weight: sent [96], expected [64]" in err.value.mismatches
        assert err.value.who == f"engine 0 ({server.url})"
        assert sync.weight_versions() == {f"engine 0 ({server.url})": "3"}
    assert server.greedy(ps, N) == served


def test_push_during_generation_keeps_the_request(server):
    """pause_mode "keep" (the default) freezes an in-flight request; the caches are reset (which preempts it) and
    after resume it finishes, its later tokens computed under the new weights."""
    prompt, n = [7, 8, 9], 500
    model = build_model(seed=0)
    with WeightSync(model, [server.url]) as sync:
        first = sync.engine_version + 1  # versions continue from what the engine served (earlier tests' trainers)
        # On a loaded machine the 500 tokens can be done before the pause reaches the server; then the update did
        # not land mid-request and the attempt proves nothing, so it is tried again (at most 3 times).
        for attempt in range(3):
            sync.push()  # the server now serves `model`
            old = server.greedy([prompt], n)[0]
            perturb(model, seed=51 + attempt)
            out, started = {}, threading.Event()
            t = threading.Thread(target=lambda: out.update(tokens=server.stream_greedy(prompt, n, started)))
            t.start()
            assert started.wait(60)  # the request is generating
            report = sync.push()
            t.join(120)
            assert len(out["tokens"]) == n
            if out["tokens"] != old:  # the update landed while the request was running ...
                break
    assert report.version == first + 2 * attempt + 1
    assert out["tokens"] != old, "the update never landed while a request was running"
    assert out["tokens"][:1] == old[:1]  # ... which had started under the old weights
    assert server.greedy(list(prompts().values()), N) == hf_reference(model, N)


def test_fsdp2_two_ranks_to_one_server(server):
    before = int(served_version(server) or 0)  # the new trainer continues from it
    roles = [("trainer", r, 2, fsdp_trainer, (server.url, 31)) for r in range(2)]
    out = run_roles(roles, timeout=240)
    rank0 = out[("trainer", 0)]
    assert rank0["report"]["version"] == out[("trainer", 1)]["report"]["version"] == before + 1
    assert rank0["versions"] == {f"engine 0 ({server.url})": str(before + 1)}
    model = build_model(seed=0)
    missing, unexpected = model.load_state_dict(rank0["state"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert hf_reference(model, N) != hf_reference(build_model(seed=0), N)  # the shards really changed
    assert server.greedy(list(prompts().values()), N) == hf_reference(model, N)


def test_two_rank_trainer_is_refused_on_every_rank(server):
    ps = list(prompts().values())
    served = server.greedy(ps, N)
    out = run_roles([("trainer", r, 2, mismatched_trainer, (server.url,)) for r in range(2)], timeout=240)
    assert out[("trainer", 0)]["error"] == out[("trainer", 1)]["error"] == "HandshakeMismatch"
    assert out[("trainer", 0)]["mismatches"] == out[("trainer", 1)]["mismatches"]
    line = "receiver 1: wrong shape for model.norm.weight: sent [96], expected [64]"
    assert line in out[("trainer", 1)]["mismatches"]
    assert server.greedy(ps, N) == served


def test_one_trainer_two_engines_in_process_and_http(server, model_dir):
    ps = list(prompts().values())
    model = build_model(seed=0)
    with in_process_llm(model_dir) as llm:
        with WeightSync(model, [llm, server.url], SyncConfig(bucket_mb=0.1, pause_mode="wait")) as sync:
            for step in range(2):
                train_step(model, seed=200 + step)  # pause mode "wait" on both (the server drains, nothing runs)
                report = sync.push()
                assert report.num_receivers == 3  # the in-process engine's worker, then the server's two
                assert served_version(llm) == str(report.version)
                assert sync.weight_versions()[f"engine 1 ({server.url})"] == str(report.version)
                want = hf_reference(model, N)
                assert llm_greedy(llm, ps, N) == want
                assert server.greedy(ps, N) == want
