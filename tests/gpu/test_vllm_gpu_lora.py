"""LoRA pushes into a REAL vLLM engine on a GPU (issue 27; the device tool's H100/H200 with ../shared/gpu-vllm's vLLM
0.26), CUDA graphs on, the engine core in its own process (the push goes by CUDA IPC from this trainer process).

* adapter mode: an engine started with LoRA; three pushes of a PEFT adapter (rank 8, all seven linear kinds, B
  non-zero) with training in between; its greedy tokens under ``sync.lora_request()`` must equal a FRESH engine
  loading the same adapter from disk (``save_pretrained``), and requests without it keep the base;
* merged mode: an engine without LoRA; three pushes (the base on the first); its tokens must equal a fresh engine
  loaded from HF's ``merge_and_unload`` of the trainer's PeftModel.

Run there: ``source /tmp/gpu-stash/activate.sh && python -m pytest -m gpu tests/gpu/test_vllm_gpu_lora.py``.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
vllm = pytest.importorskip("vllm")
pytest.importorskip("peft")

from tests.gpu.test_vllm_gpu import GPU_ARGS, MODEL, greedy, start_llm, stop_llm, train_step  # noqa: E402
from tests.helpers.lora import merged_copy, peft_model  # noqa: E402
from tests.helpers.models import prompts, save_model  # noqa: E402
from tests.helpers.vllm_engines import BACKEND  # noqa: E402

from trainer_sync import SyncConfig, WeightSync  # noqa: E402

LORA_ARGS = dict(enable_lora=True, max_lora_rank=8, max_loras=1)


def lora_greedy(llm, request, ps, n: int = 12) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False,
                        lora_request=request)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_model(str(tmp_path_factory.mktemp("qwen3-lora-base")), seed=0, tied=False, **MODEL)


def test_adapter_pushes_equal_a_fresh_engine_loading_the_adapter(base_dir, tmp_path):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    model = peft_model(seed=0, rank=8, alpha=16, tied=False, **MODEL).cuda()
    ps = list(prompts().values())
    llm = LLM(model=base_dir, weight_transfer_config=BACKEND, **GPU_ARGS, **LORA_ARGS)
    try:
        base_tokens = greedy(llm, ps)
        with WeightSync(model, [llm]) as sync:
            modes = []
            for step in range(3):
                train_step(model, seed=step)
                modes.append(sync.push().lora)
            got = lora_greedy(llm, sync.lora_request(), ps)
        assert modes == ["adapter"] * 3
        assert greedy(llm, ps) == base_tokens  # requests without the adapter: the base
    finally:
        stop_llm(llm)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    fresh = LLM(model=base_dir, weight_transfer_config=BACKEND, **GPU_ARGS, **LORA_ARGS)
    try:
        assert got == lora_greedy(fresh, LoRARequest("from-disk", 3, adapter_dir), ps)
    finally:
        stop_llm(fresh)


def test_merged_pushes_equal_a_fresh_engine_on_the_merged_model(base_dir, tmp_path):
    model = peft_model(seed=0, rank=8, alpha=16, tied=False, **MODEL).cuda()
    ps = list(prompts().values())
    llm = start_llm(base_dir)
    try:
        with WeightSync(model, [llm]) as sync:
            reports = []
            for step in range(3):
                train_step(model, seed=10 + step)
                reports.append(sync.push())
            got = greedy(llm, ps)
    finally:
        stop_llm(llm)
    assert [r.lora for r in reports] == ["merged", "merged-partial", "merged-partial"]
    assert reports[1].bytes < reports[0].bytes
    ref_dir = str(tmp_path / "merged")
    merged_copy(model).save_pretrained(ref_dir, safe_serialization=True)
    ref = start_llm(ref_dir)
    try:
        assert got == greedy(ref, ps)
    finally:
        stop_llm(ref)


def test_sync_config_default_is_auto():
    assert SyncConfig().lora == "auto"
