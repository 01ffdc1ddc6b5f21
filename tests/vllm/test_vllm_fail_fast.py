"""Fail fast: an exception on an engine fails the push on every trainer rank within moments, naming the engine and
the engine's own error, never after the whole timeout (issue 13).

The engine fails for a real reason: it serves a model from a config alone (``load_format="dummy"``, no safetensors
checkpoint, so no handshake can check names and shapes) and the trainer pushes a wider model, which vLLM's own
weight loader rejects inside the engine while the push is on the wire (many small buckets, so the trainer ranks are
still sending). Before the abort path, every trainer rank then waited out its ``timeout_s`` for receivers that had
given up.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.helpers.models import tiny_config
from tests.helpers.cluster import run_roles
from tests.helpers.vllm_engines import ENGINE_ARGS, oversized_trainer, running_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def dummy_server(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("config-only"))
    cfg = tiny_config()
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.save_pretrained(model_dir)  # config.json only: the engine has no checkpoint to check a push against
    with running_server(model_dir, tmp_path_factory, "dummy-serve",
                        engine_args={**ENGINE_ARGS, "load_format": "dummy"}) as srv:
        yield srv


def test_an_engine_failing_in_its_loader_fails_every_trainer_rank_at_once(dummy_server):
    out = run_roles([("trainer", r, 2, oversized_trainer, (dummy_server.url, TIMEOUT_S)) for r in range(2)],
                    timeout=240)
    for r in range(2):
        res = out[("trainer", r)]
        assert res["error"], f"trainer rank {r} did not fail"
        assert res["seconds"] < 10, (r, res)  # not the 60 s timeout
        assert "engine 0 (" + dummy_server.url in res["error"], res["error"]  # the engine, by its URL
        # The engine's own error: vLLM's bare shape assert, with where it was raised (vLLM passes on str(error)).
        assert "AssertionError at " in res["error"] and "numel()" in res["error"], res["error"]
        assert "stays paused" in res["error"], res["error"]  # maybe half updated: never served as if whole
