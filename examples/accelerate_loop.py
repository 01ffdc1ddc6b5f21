"""An Accelerate training loop on 2 ranks with ONE line for weight sync: ``sync.attach(optimizer)``.

    .venv/bin/accelerate launch --config_file recipes/accelerate/cpu.yaml examples/accelerate_loop.py   # ~1 min

Both ranks train a DDP copy of the policy (gloo on CPU, NCCL on GPUs); rank 0 starts a vLLM engine (its engine core
in a process of its own: an in-process engine would take the trainer's default process group as its own). The
optimizer's step post-hook pushes after every update, on both ranks together, as version = the step. At the end
the engine's greedy tokens must equal transformers' on the trainer's weights.
"""
from __future__ import annotations

import os
import tempfile

import torch
from accelerate import Accelerator
from tiny import BACKEND, CPU_ENGINE, batches, check, hf_greedy, llm_greedy, tiny_policy

from trainer_sync import SyncConfig, WeightSync

STEPS = 4


def start_engine(path: str):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine core in its own process (see above)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # a fork would inherit the trainer's groups
    from vllm import LLM

    return LLM(model=path, weight_transfer_config=BACKEND, **CPU_ENGINE)


def main() -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank = accelerator.process_index
    path = os.path.join(tempfile.gettempdir(), f"accelerate-example-{os.environ.get('MASTER_PORT', 'x')}")
    model = tiny_policy(path if rank == 0 else None)   # the same seeded weights on every rank
    llm = start_engine(path) if rank == 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)

    sync = WeightSync(model, engines=[llm] if rank == 0 else None, config=SyncConfig(tb_dir="runs/sync"))

    # plain PyTorch or Accelerate (the optimizer accelerator.prepare returned): after every k-th real update
    sync.attach(optimizer, every=1)
    for batch in batches(STEPS, seed=rank):   # each rank its own data
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()                       # the hook pushes here, on every rank together
        optimizer.zero_grad()
    version = sync.weight_versions() if rank == 0 else None
    sync.close()
    if rank == 0:
        check("accelerate_loop", llm_greedy(llm), hf_greedy(accelerator.unwrap_model(model)), ranks=2,
              versions=version)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
