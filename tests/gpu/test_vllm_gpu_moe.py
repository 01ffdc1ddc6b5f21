"""A tiny Qwen3-MoE into a REAL vLLM engine on a GPU (vLLM 0.26 from ../shared/gpu-vllm, CUDA graphs on), issue 26.

transformers keeps the experts fused; trainer_sync pushes them under the checkpoint's per-expert names into vLLM's
FusedMoE ``w13_weight`` / ``w2_weight``. The fast path must learn places INSIDE those 3-D parameters (one expert's
gate and up in one ``w13`` row block), prove them on the first (layerwise) push and take over; after three pushes
that change only some experts, the engine generates exactly what a fresh engine on the trainer's weights does.

Run there: ``source /tmp/gpu-stash/activate.sh && python -m pytest -m gpu tests/gpu/test_vllm_gpu_moe.py``.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
vllm = pytest.importorskip("vllm")

from tests.gpu.test_vllm_gpu import fresh_tokens, greedy, start_llm, stop_llm  # noqa: E402
from tests.helpers.models import build_model, prompts, save_model, touch_experts  # noqa: E402

from trainer_sync import SyncConfig, WeightSync  # noqa: E402

MOE = dict(kind="qwen3_moe", dtype="bfloat16", hidden=128, layers=2, experts=8, top_k=2, expert_width=64)
STEPS = [[0, 3], [5], [3, 6]]


@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory):
    llm = start_llm(save_model(str(tmp_path_factory.mktemp("qwen3-moe")), seed=0, **MOE))
    yield llm
    stop_llm(llm)


@pytest.mark.parametrize("apply", ["auto", "layerwise"])
def test_moe_pushes_equal_a_fresh_engine(moe_engine, apply, tmp_path):
    model = build_model(seed=0, **MOE).cuda()
    ps = list(prompts().values())
    before = greedy(moe_engine, ps)
    applied = []
    with WeightSync(model, [moe_engine], SyncConfig(engine_apply=apply)) as sync:
        for step, experts in enumerate(STEPS):
            touch_experts(model, experts, seed=step + (10 if apply == "layerwise" else 0), scale=0.5)
            applied.append(sync.push().engine_apply)
    after = greedy(moe_engine, ps)
    assert after != before
    assert after == fresh_tokens(model, tmp_path, f"ref-{apply}")
    if apply == "auto":
        assert applied == ["layerwise", "direct", "direct"], applied
    else:
        assert applied == ["layerwise"] * 3
