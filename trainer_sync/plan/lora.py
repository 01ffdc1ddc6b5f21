"""LoRA pushes, the pure part (issue 27): which mode a push takes, what the engines would refuse, which tensors go.

Trainer rank 0 decides per push from data alone: its LoraSource's tensors (adapter / merged / dense, by name), the
adapter's modules, and what each receiver said when it joined (``LoraSupport``, ``Expected``):
  * ``choose_mode``: ``SyncConfig.lora`` ``adapter`` or ``merged`` as asked; ``auto`` takes adapter mode when every
    engine has LoRA enabled, merged otherwise, and says why;
  * ``adapter_refusals``: in adapter mode, every reason an engine could not install the adapter (LoRA not enabled,
    a rank above its ``max_lora_rank``, a module it cannot adapt or whose shape differs), one line each, naming the
    module or the setting; the push is refused before any byte moves;
  * ``select``: the tensor names that travel: the adapter's A/B (plus the dense ``modules_to_save``) in adapter
    mode; in merged mode everything on the first push (``with_base``), then only the merged weights of the adapted
    modules, completed to whole engine layers (an engine that fuses q/k/v into one layer reloads it whole, so the
    unadapted parts of a fused layer travel too), with their biases and the ``modules_to_save``.
"""
from __future__ import annotations

from ..protocol.lora import LoraSupport

ADAPTER, MERGED, DENSE = "adapter", "merged", "dense"  # a LoraSource's kinds of tensors


def choose_mode(requested: str, supports: list[LoraSupport | None]) -> tuple[str, str]:
    """``(mode, why)`` for a push to receivers whose LoRA abilities are ``supports`` (None: it said nothing)."""
    if requested in (ADAPTER, MERGED):
        return requested, f"SyncConfig(lora={requested!r})"
    if requested != "auto":
        raise ValueError(f"SyncConfig.lora must be auto, adapter or merged, got {requested!r}")
    without = [j for j, s in enumerate(supports) if s is None or not s.enabled]
    if supports and not without:
        return ADAPTER, "every engine has LoRA enabled"
    if not supports:
        return MERGED, "no receiver"
    return MERGED, f"receiver {without[0]} has no LoRA enabled (vLLM enable_lora=False)"


def module_of(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return name.rsplit(".", 1)[0]


def adapter_refusals(modules: dict[str, tuple[int, int, int]], support: LoraSupport | None,
                     expected: dict[str, tuple] | None, who: str) -> list[str]:
    """Why receiver ``who`` cannot take this adapter (empty: it can). ``modules``: adapted module -> (rank, in,
    out) from the trainer's A ``[rank, in]`` and B ``[out, rank]``; ``expected``: the receiver's checkpoint tensors
    (name -> (shape, dtype)), for the shapes; ``support``: what it said of LoRA (None: nothing, not a LoRA engine)."""
    if support is None or not support.enabled:
        top = max((r for r, _, _ in modules.values()), default=0)
        return [f"{who}: SyncConfig(lora='adapter') but the engine was started without LoRA: start it with "
                f"enable_lora=True and max_lora_rank >= {top} (vllm serve --enable-lora --max-lora-rank {top}), or "
                f"use lora='merged' (or 'auto')"]
    errors = []
    known = set(support.modules)
    for module, (rank, n_in, n_out) in sorted(modules.items()):
        if module not in known:
            errors.append(f"{who}: target module {module} is not one the engine's model can adapt (it adapts "
                          f"{len(known)} modules, e.g. {sorted(known)[:2]})")
            continue
        if rank > support.max_lora_rank:
            errors.append(f"{who}: module {module}: adapter rank {rank} is above the engine's max_lora_rank "
                          f"{support.max_lora_rank} (start it with max_lora_rank >= {rank})")
        shape = (expected or {}).get(module + ".weight")
        if shape is not None and tuple(shape[0]) != (n_out, n_in):
            errors.append(f"{who}: module {module}: the adapter maps {n_in} -> {n_out} features, the engine's "
                          f"weight is {list(shape[0])}")
    return errors


def select(mode: str, kinds: dict[str, str], saved_modules: tuple[str, ...] = (),
           packing: dict[str, list[str]] | None = None, with_base: bool = True) -> list[str]:
    """The names that travel, in the source's order. ``kinds``: name -> adapter / merged / dense;
    ``saved_modules``: the modules_to_save (checkpoint names; trained whole: their dense weights always go);
    ``packing``: the engines' fused layers (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``)."""
    saved = set(saved_modules)

    def is_saved(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in saved)

    if mode == ADAPTER:
        return [n for n, k in kinds.items() if k == ADAPTER or (k == DENSE and is_saved(n))]
    if mode != MERGED:
        raise ValueError(f"unknown LoRA push mode {mode!r}")
    if with_base:
        return [n for n, k in kinds.items() if k != ADAPTER]
    modules = {module_of(n) for n, k in kinds.items() if k == MERGED}
    for group in (packing or {}).values():  # whole fused layers: every part of a group that has an adapted part
        for m in list(modules):
            parent, _, leaf = m.rpartition(".")
            if leaf in group:
                modules.update(f"{parent}.{part}" if parent else part for part in group)
    return [n for n, k in kinds.items() if k != ADAPTER and (module_of(n) in modules or is_saved(n))]
