"""LoraSource: a PEFT LoRA model as the planner sees it, offering both ways to serve it.

Every push it offers three kinds of tensors, and trainer rank 0's plan picks which travel (plan/lora.py):
  * ``adapter``: lora_A / lora_B of every adapted module under PEFT's saved names (adapter mode: megabytes);
  * ``merged``: for every adapted module, ``base + scaling * B @ A`` under the checkpoint's weight name, computed
    lazily while packing (merged mode; never kept);
  * ``dense``: every other parameter the engine holds, under its checkpoint name (the base, and the trained
    ``modules_to_save`` copies), as the inner source holds it.

The arithmetic is PEFT's own merge (``peft.tuners.lora.Linear.get_delta_weight``: ``(B @ A) * scaling``, in float32
for half-precision weights on CPU, then added to the weight), so a merged push serves exactly ``merge_and_unload``.

Sharding: the inner source is the usual one for the wrapping (plain/DDP, FSDP2, ZeRO-3). A merged weight's pieces
are the base weight's pieces. FSDP2 shards the weight and lora_B along their output rows alike, so a rank computes
its own rows from its own shards and the full lora_A (``r x in``, small), gathered once per round inside
``gathering()``, which every trainer rank enters for every round with the same names. ZeRO-3 gathers the weight,
A and B of a round's merged tensors together there.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from ..plan.buckets import LocalPiece
from ..plan.lora import ADAPTER, DENSE, MERGED
from .base import Source
from .peft import Adapter, AdaptedModule, engine_name, saved_name

def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def merged_rows(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """``weight + (b @ a) * scaling`` as PEFT merges it (``weight``/``b``: the same output rows; ``a``: whole).
    PEFT keeps the adapter in float32 beside a half-precision base (its autocast), so the sum is rounded once, to the
    weight's dtype, as its in-place merge does."""
    dtype = b.dtype
    cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast:
        a, b = a.float(), b.float()
    delta = b @ a
    if fan_in_fan_out:
        delta = delta.T
    delta.mul_(scaling)
    if cast:
        delta = delta.to(dtype)
    return weight.clone().add_(delta)  # PEFT: ``base_layer.weight.data += delta`` (in the weight's dtype)


class LoraSource(Source):
    def __init__(self, inner: Source, adapter: Adapter, rename: dict[str, str] | None = None):
        # No Source.__init__: tensors, ranks and sharding are the inner source's (built without ``rename``, which
        # applies to the checkpoint names offered here).
        self.inner, self.adapter = inner, adapter
        self.rename = rename or {}
        self.model, self.rank, self.world = inner.model, inner.rank, inner.world
        self.kind: dict[str, str] = {}
        self.trainer: dict[str, str] = {}  # offered name -> the inner source's name (a merged one: its weight)
        self.module_of: dict[str, AdaptedModule] = {}  # merged name -> its module
        adapted_weights = {m.weight: m for m in adapter.modules}
        lora_params = {m.a: (m, "lora_A") for m in adapter.modules} | {m.b: (m, "lora_B") for m in adapter.modules}
        for name in inner.params:
            if name in lora_params:
                m, which = lora_params[name]
                self._offer(saved_name(m.module, which), ADAPTER, name)
                continue
            engine = engine_name(name, adapter.name)
            if engine is None:
                continue
            if name in adapted_weights:
                self._offer(engine, MERGED, name)
                self.module_of[self.rename.get(engine, engine)] = adapted_weights[name]
            else:
                self._offer(engine, DENSE, name)
        missing = [m.module for m in adapter.modules if m.a not in inner.params or m.weight not in inner.params]
        if missing:
            raise ValueError(f"trainer_sync: the LoRA modules {missing[:3]} have no lora_A or base weight among the "
                             f"model's parameters")
        # The live parameter behind each offered name that IS one (what CUDA IPC's direct path exports and reads in
        # place): never a merged weight (computed while packing; its base parameter holds other values), and none
        # under ZeRO-3 (partitions: its tensors exist only while gathered).
        from .deepspeed import DeepSpeedSource

        self.params = {} if isinstance(inner, DeepSpeedSource) else \
            {n: inner.params[t] for n, t in self.trainer.items() if self.kind[n] != MERGED}
        renamed = {t: n for n, t in self.trainer.items()}
        self.aliases = {renamed[p]: tuple(self.rename.get(e, e) for a in names if (e := engine_name(a, adapter.name)))
                        for p, names in inner.aliases.items() if p in renamed}
        self._full_a: dict[str, torch.Tensor] = {}  # merged name -> whole lora_A, during one round (FSDP2)
        self._shape: dict[str, tuple[int, ...]] = {}  # offered name -> global shape (set by pieces(), every push)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _offer(self, name: str, kind: str, trainer: str) -> None:
        if kind != ADAPTER:
            name = self.rename.get(name, name)
        if name in self.kind:
            raise ValueError(f"trainer_sync: two parameters of the PEFT model map to {name} "
                             f"({self.trainer[name]} and {trainer})")
        self.kind[name], self.trainer[name] = kind, trainer

    def names(self, kind: str) -> list[str]:
        return [n for n, k in self.kind.items() if k == kind]

    # -- the Source interface ------------------------------------------------------------------------------------
    def pieces(self) -> list[LocalPiece]:
        by_trainer = {p.name: p for p in self.inner.pieces()}
        self._shape = {n: by_trainer[t].shape for n, t in self.trainer.items() if t in by_trainer}
        return [replace(by_trainer[t], name=n) for n, t in self.trainer.items() if t in by_trainer]

    def flat(self, name: str) -> torch.Tensor:
        if self.kind[name] != MERGED:
            return self.inner.flat(self.trainer[name])
        m = self.module_of[name]
        out_in = self._shape[name]
        w_local = self.inner.flat(m.weight)
        b_local = self.inner.flat(m.b).view(-1, m.rank)
        a = self._full_a.get(name)
        if a is None:  # whole on this rank (plain/DDP, or gathered by ZeRO-3)
            a = self.inner.flat(m.a).view(m.rank, -1)
        if m.fan_in_fan_out:  # weight stored [in, out]; B's rows are output rows: only unsharded models
            return merged_rows(w_local.view(out_in), b_local, a, m.scaling, True).reshape(-1)
        rows = w_local.numel() // out_in[1] if len(out_in) == 2 else 0
        return merged_rows(w_local.view(rows, out_in[1]), b_local, a, m.scaling).reshape(-1)

    def live(self, name: str) -> torch.Tensor | None:
        # A merged weight is computed afresh each push (its base weight is not what travels): nothing to map.
        return None if self.kind.get(name) == MERGED else self.inner.live(self.trainer[name])

    def gathering(self, names: list[str]):
        inner_names = []
        for n in names:
            if self.kind[n] == MERGED:
                m = self.module_of[n]
                inner_names += [m.weight, m.a, m.b]
            else:
                inner_names.append(self.trainer[n])
        stack = contextlib.ExitStack()
        stack.enter_context(self.inner.gathering(list(dict.fromkeys(inner_names))))
        # FSDP2: the whole lora_A of this round's merged weights (one all-gather each, on every rank in this order).
        for n in names:
            if self.kind[n] == MERGED and _is_dtensor(self.inner.params[self.module_of[n].a]):
                self._full_a[n] = self.inner.params[self.module_of[n].a].detach().full_tensor()
        stack.callback(self._full_a.clear)
        return stack

    def nonfinite(self) -> list[str]:
        bad = set(self.inner.nonfinite())
        out = [n for n, t in self.trainer.items() if t in bad and self.kind[n] != MERGED]
        out += [n for n, m in self.module_of.items() if {m.weight, m.a, m.b} & bad]
        return out

