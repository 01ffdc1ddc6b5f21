"""PEFT LoRA models for the LoRA tests (issue 27): the tiny models of models.py with a LoRA adapter on every linear
kind (q/k/v/o/gate/up/down), its B non-zero from the start (``init_lora_weights=False``: PEFT's default B = 0 would
make the first push prove nothing), and the engine settings that serve it."""
from __future__ import annotations

import torch

from .models import build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
# An engine that serves the adapter: LoRA on, rank room for it, one adapter slot.
LORA_ENGINE = dict(enable_lora=True, max_lora_rank=8, max_loras=1)


def peft_model(seed: int = 0, rank: int = RANK, alpha: int = 8, targets: list[str] | None = None, **model_kwargs):
    """The tiny model (seed ``seed``) with a LoRA adapter whose A and B are random (same seed: same adapter)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(seed=seed, **model_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS,
                                                init_lora_weights=False))
    return model.eval()


def merged_copy(model):
    """HF's own merge of a PEFT model (``merge_and_unload`` on a copy): the dense model a merged push must serve."""
    import copy

    return copy.deepcopy(model).merge_and_unload().eval()
