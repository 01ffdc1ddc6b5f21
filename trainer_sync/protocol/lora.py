"""What trainer and engines say about LoRA (issue 27), and nothing else.

* ``LoraSupport``: what an engine worker can do with an adapter, published when it joins (``lora_key``) before its
  ``Expected``, so a trainer that has read every receiver's expectations has read this too. Trainer rank 0 decides
  the mode of each push from it (adapter into engines that all have LoRA enabled, merged otherwise) and refuses a
  push the engine could not take (rank above ``max_lora_rank``, a module it cannot adapt) before any byte moves.
* ``LoraOffer``: the LoRA part of a push's plan (``PlanOffer.lora``): ``adapter`` pushes carry the adapter's
  A/B tensors (PEFT's saved names) plus its name, id and PEFT config, so the engine installs them as the new
  version of that one adapter; ``merged`` pushes carry dense weights of the model (``partial``: only the adapted
  modules, so the receivers check no missing tensors).

Only the standard library (a vLLM worker imports this to join).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .wire import PROTOCOL_VERSION

LORA_MODES = ("auto", "adapter", "merged")


def lora_key(receiver: int) -> str:
    """The store key of receiver ``receiver``'s ``LoraSupport``."""
    return f"lora/support/{receiver}"


@dataclass(frozen=True)
class LoraSupport:
    """One engine worker's LoRA abilities.

    ``enabled``: the engine was started with LoRA (vLLM ``enable_lora=True``); ``max_lora_rank`` / ``max_loras``
    its settings; ``modules``: the names of the modules it can adapt, as the checkpoint names them
    (``model.layers.0.self_attn.q_proj``: vLLM's packed ``qkv_proj`` listed as its parts); ``packing``: which
    checkpoint modules the engine fuses into one layer (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``), which
    a merged push must send whole; ``dtype``: the dtype it keeps adapters in."""

    enabled: bool = False
    max_lora_rank: int = 0
    max_loras: int = 0
    modules: list[str] = field(default_factory=list)
    packing: dict[str, list[str]] = field(default_factory=dict)
    dtype: str | None = None
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class LoraOffer:
    """The LoRA part of one push's plan. ``mode``: ``adapter`` or ``merged``. Adapter pushes: the adapter's
    ``name`` and ``id`` in the engine (the same every version) and ``config`` (the PEFT LoraConfig fields vLLM
    reads: r, lora_alpha, target_modules, use_rslora, rank_pattern, alpha_pattern, modules_to_save, ...). Merged
    pushes: ``partial`` when only the adapted modules travel (the base went on an earlier push). ``why``: the
    reason for the mode, which every trainer rank's report repeats."""

    mode: str
    name: str = ""
    id: int = 0
    config: dict = field(default_factory=dict)
    partial: bool = False
    why: str = ""  # why this mode (SyncConfig.lora, or what "auto" saw): for the report of every trainer rank
    protocol_version: int = PROTOCOL_VERSION
