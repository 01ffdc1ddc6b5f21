"""Delta pushes into a REAL vLLM 0.26 engine on a GPU (the device tool's H200 with ../shared/gpu-vllm): no stand-ins.

The trainer is this test process: fp32 master weights on the CPU, moved by real AdamW steps, pushed over gloo as
bf16 (the engine serves bf16). The engine runs with vLLM's defaults (torch.compile and CUDA graphs; the engine core
in its own process). Push 1 goes full through vLLM's layerwise reload, which proves the fast path (placement.py);
from then on the worker's receiver holds the fast path's whole parameter slices as its delta targets (no mirror,
no extra GPU copy), so pushes 2..6 travel as deltas and are written straight into the served weights. What counts
is what the engine then generates: its greedy tokens must equal a FRESH engine loaded from the trainer's bf16
weights (saved as a checkpoint).

Run there: ``source /tmp/gpu-stash/activate.sh && python -m pytest -s tests/gpu/test_vllm_gpu_delta.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
vllm = pytest.importorskip("vllm")

from tests.gpu.test_vllm_gpu import MODEL, greedy, start_llm, stop_llm  # noqa: E402
from tests.helpers.models import adamw_step, build_model, prompts, save_model  # noqa: E402

from trainer_sync import SyncConfig, WeightSync  # noqa: E402

PUSHES = 6


def fresh_bf16_tokens(model, path: str) -> list[list[int]]:
    """Greedy tokens of a fresh engine started from the trainer's weights as the engine serves them (bf16)."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    ref = start_llm(path)
    try:
        return greedy(ref, list(prompts().values()))
    finally:
        stop_llm(ref)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_delta_pushes_go_straight_into_the_served_slices(tied, tmp_path):
    llm = start_llm(save_model(str(tmp_path / "served"), seed=0, tied=tied, **MODEL))
    try:
        model = build_model(seed=1, tied=tied, **{**MODEL, "dtype": "float32"})  # fp32 master weights, on the CPU
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
        reports = []
        with WeightSync(model, [llm], SyncConfig(bucket_mb=0.25)) as sync:
            for step in range(PUSHES):
                adamw_step(model, opt, step, seq=32)
                reports.append(sync.push())
        tokens = greedy(llm, list(prompts().values()))
    finally:
        stop_llm(llm)
    for i, r in enumerate(reports, 1):
        print(f"[{'tied' if tied else 'untied'}] push {i}: {r.engine_apply}, {r.bytes_sent} of {r.bytes_full} bytes "
              f"({r.changed_fraction}), {r.total_s * 1e3:.1f} ms, full_reason={r.full_reason!r}")
    first, rest = reports[0], reports[1:]
    assert first.full_reason == "first push (no base version yet)" and first.engine_apply == "layerwise"
    assert first.wire_dtype == "bfloat16"
    for r in rest:
        assert r.full_reason is None, r
        assert r.engine_apply == "direct", r
        assert 0 < r.bytes_sent < r.bytes_full == r.bytes and 0 < r.changed_fraction < 1, r
    assert tokens == fresh_bf16_tokens(model, str(tmp_path / "ref"))
