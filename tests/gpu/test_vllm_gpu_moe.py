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


def test_block_fp8_moe_engine_takes_an_auto_push(tmp_path):
    """A block-FP8 MoE checkpoint (float8 per-expert weights + float32 128x128 block scales, as Qwen3-30B-A3B-FP8):
    the default wire_dtype="auto" sends each expert's codes and scales in checkpoint format, and after two pushes
    that change some experts the engine generates exactly what a fresh engine on a block-FP8 checkpoint of the
    trainer's weights does (the reference is quantized by the same GPU kernel)."""
    from tests.helpers.fp8_engines import save_block_fp8

    # every width a whole 128-block: vLLM's block-FP8 FusedMoE needs each expert's gate, up and down so
    fp8 = dict(MOE, hidden=256, head_dim=128, expert_width=128)
    model = build_model(seed=0, **fp8).cuda()
    ps = list(prompts().values())
    llm = start_llm(save_block_fp8(model, str(tmp_path / "block-fp8-moe")))
    try:
        before = greedy(llm, ps)
        reports = []
        with WeightSync(model, [llm]) as sync:
            for step, experts in enumerate(STEPS[:2]):
                touch_experts(model, experts, seed=40 + step, scale=0.5)
                reports.append(sync.push())
        pushed = greedy(llm, ps)
    finally:
        stop_llm(llm)
    assert all("float8_e4m3fn" in r.wire_dtype for r in reports), [r.wire_dtype for r in reports]
    assert pushed != before
    ref = start_llm(save_block_fp8(model, str(tmp_path / "ref-block-fp8-moe")))
    try:
        assert pushed == greedy(ref, ps), [r.engine_apply for r in reports]
    finally:
        stop_llm(ref)
