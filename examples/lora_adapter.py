"""A PEFT LoRA policy pushed as its adapter (megabytes), not the model: ``SyncConfig(lora="auto")``.

    .venv/bin/python examples/lora_adapter.py     # CPU, ~40 s

The engine runs with LoRA (``enable_lora=True``, ``max_lora_rank`` >= the adapter's rank), so ``auto`` picks adapter
mode: only A and B of each adapted module go, and the engine installs them in memory as the new version of one named
adapter (no file). Requests under ``sync.lora_request()`` use it; requests without keep the base model. An engine
without LoRA would get merged mode instead (base + scale * B @ A of the adapted modules only). At the end the
engine's tokens under the adapter must equal transformers' PeftModel on the trainer's weights.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process

import torch
from peft import LoraConfig, get_peft_model
from tiny import CPU_ENGINE, batches, check, hf_greedy, llm_greedy, tiny_policy, train_step
from vllm import LLM

from trainer_sync import SyncConfig, WeightSync


def main() -> None:
    path = tempfile.mkdtemp(prefix="lora-example-")
    base = tiny_policy(path)      # the engine serves the base; the adapter comes with the first push
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    llm = LLM(model=path, weight_transfer_config={"backend": "trainer_sync"},
              enable_lora=True, max_lora_rank=16, **{**CPU_ENGINE, "max_loras": 1})  # without enable_lora: merged
    sync = WeightSync(policy, [llm], SyncConfig(lora="auto"))  # "adapter" | "merged" | "auto" (the default)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(steps=3):
        train_step(policy, optimizer, batch)
        report = sync.push()
        print(f"v{report.version}: {report.lora} ({report.lora_reason}), {report.bytes_sent / 1e3:.0f} kB")
    # after the first push, sample under the trainer's adapter (the same name and id every version):
    served = llm_greedy(llm, lora_request=sync.lora_request())
    sync.close()
    check("lora_adapter", served, hf_greedy(policy), mode=report.lora, adapter_kB=round(report.bytes_sent / 1e3))


if __name__ == "__main__":
    main()
