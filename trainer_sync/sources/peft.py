"""A PEFT LoRA model, recognised and described: which modules the adapter adapts, and every name both sides need.

A ``peft.PeftModel`` holding a LoRA adapter (bare, or inside DDP, an FSDP2 ``fully_shard``, a DeepSpeed engine or
``torch.compile``) is seen by ``find_adapter``; anything else gives None and trainer_sync treats the model as dense.

Three namings meet here (``base_model.model.`` is PEFT's prefix of the wrapped model):
  * the trainer's parameters, as ``Source`` cleans them: ``base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.default.weight``, ``...q_proj.base_layer.weight``, ``...lm_head.modules_to_save.default.weight``;
  * the engine's checkpoint names (``engine_name``): ``model.layers.0.self_attn.q_proj.weight``, the names a merged
    push sends: PEFT's wrappers (``base_layer``, ``modules_to_save.<adapter>``) taken out;
  * PEFT's saved adapter names (``saved_name``): ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
    (the adapter name dropped), what ``save_pretrained`` writes and what vLLM's LoRA loader parses.

Only what PEFT's modules expose (``lora_A`` / ``lora_B`` / ``scaling`` / ``r`` / ``base_layer``) is used, and the
adapter's ``LoraConfig`` fields that vLLM reads (``ADAPTER_CONFIG_FIELDS``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import clean_name, unwrap

PEFT_PREFIX = "base_model.model."
# The LoraConfig fields vLLM's PEFTHelper reads (the others stay on the trainer).
ADAPTER_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora",
                         "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "use_qalora")


@dataclass(frozen=True)
class AdaptedModule:
    """One module the adapter adapts: ``module`` is its checkpoint name (``model.layers.0.self_attn.q_proj``);
    ``a`` / ``b`` / ``weight`` / ``bias`` the trainer's parameter names of lora_A, lora_B and the base layer's
    weight and bias (None without one); ``rank`` and ``scaling`` PEFT's for this module; ``fan_in_fan_out``: the
    base weight is stored transposed (GPT-2's Conv1D)."""

    module: str
    a: str
    b: str
    weight: str
    bias: str | None
    rank: int
    scaling: float
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter of a PEFT model: its PEFT name (``default``), the config fields vLLM reads, the adapted
    modules, and the checkpoint names of the ``modules_to_save`` (trained whole, so they travel as dense weights)."""

    name: str
    config: dict
    modules: tuple[AdaptedModule, ...]
    saved_modules: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)


def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return peft, LoraLayer, ModulesToSaveWrapper


def engine_name(trainer_name: str, adapter: str) -> str | None:
    """The checkpoint name of a trainer parameter of a PEFT model, or None for a parameter the engine never holds
    (lora_A / lora_B of any adapter, the frozen original beside a ``modules_to_save`` copy, other adapters' copies).
    """
    parts = trainer_name.removeprefix(PEFT_PREFIX).split(".")
    out = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "original_module"):
            return None
        if p == "modules_to_save":
            if i + 1 >= len(parts) or parts[i + 1] != adapter:
                return None
            i += 2
            continue
        if p != "base_layer":
            out.append(p)
        i += 1
    return ".".join(out)


def saved_name(module: str, which: str) -> str:
    """PEFT's saved name of a module's lora_A or lora_B (``which``), as vLLM's loader parses it."""
    return f"{PEFT_PREFIX}{module}.{which}.weight"


def _config_dict(config) -> dict:
    out = {}
    for key in ADAPTER_CONFIG_FIELDS:
        value = getattr(config, key, None)
        if isinstance(value, (set, frozenset, tuple)):
            value = sorted(value)
        out[key] = value
    return out


def find_adapter(model: torch.nn.Module) -> Adapter | None:
    """The active LoRA adapter of a PEFT model (also wrapped), or None (no peft installed, not a PEFT model, or its
    adapter is not LoRA). Several active adapters are refused: an engine serves one of them per request."""
    loaded = _peft()
    if loaded is None:
        return None
    peft, lora_layer, saver = loaded
    inner = unwrap(model)
    if not isinstance(inner, peft.PeftModel):
        return None
    active = inner.active_adapters if hasattr(inner, "active_adapters") else [inner.active_adapter]
    if len(active) != 1:
        raise ValueError(f"trainer_sync: the PEFT model has {len(active)} active adapters ({active}); push one at a "
                         f"time (model.set_adapter(name))")
    name = active[0]
    config = inner.peft_config[name]
    if str(getattr(config, "peft_type", "")).split(".")[-1].upper() != "LORA":
        return None
    modules, saved = [], []
    for raw, mod in inner.named_modules():
        path = clean_name(raw)
        if isinstance(mod, lora_layer) and name in getattr(mod, "lora_A", {}):
            base = mod.get_base_layer()
            module = path.removeprefix(PEFT_PREFIX)
            modules.append(AdaptedModule(
                module, f"{path}.lora_A.{name}.weight", f"{path}.lora_B.{name}.weight", f"{path}.base_layer.weight",
                f"{path}.base_layer.bias" if getattr(base, "bias", None) is not None else None,
                int(mod.r[name]), float(mod.scaling[name]), bool(getattr(mod, "fan_in_fan_out", False))))
        elif isinstance(mod, saver) and name in getattr(mod, "modules_to_save", {}):
            saved.append(path.removeprefix(PEFT_PREFIX))
    if not modules:
        return None
    return Adapter(name, _config_dict(config), tuple(modules), tuple(saved))
