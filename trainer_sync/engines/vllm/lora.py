"""A LoRA adapter pushed into a vLLM worker, installed in memory (issue 27): no file, one adapter, whole versions.

The engine must run with LoRA (``enable_lora=True``, ``max_lora_rank`` >= the adapter's rank). A push in adapter
mode (``PlanOffer.lora``) carries the adapter's A/B tensors under PEFT's saved names; this worker copies them out of
the receive buffers as they arrive (``take``), and at ``finish_weight_update`` (the engine paused, after the last
tensor) builds vLLM's ``LoRAModel`` from them and makes it THE adapter of its id: the previous version removed,
this one registered, active and pinned in its slot (compat.py). So:
  * no file is written and vLLM's adapter cache holds one entry per trainer, whatever the number of versions;
  * requests never see two versions mixed: nothing changes before the whole version arrived, and the switch happens
    between pause and resume (the trainer resets the prefix cache after finish: the adapter id is the same every
    version, so blocks cached under the old one must go);
  * a failed push leaves the previous version installed (the staged tensors are dropped) and the engine untouched.

vLLM 0.32's worker clears every adapter after ``finish_weight_update`` (adapters trained on replaced base weights are
stale); the current version is put back right after that clear (``compat.keep_lora_after_clear``), since an adapter
push never replaces the base. ``support()`` is what the worker tells the trainer when it joins (protocol/lora.py).
"""
from __future__ import annotations

import logging
import time

import torch

from ...protocol.lora import LoraOffer, LoraSupport
from . import compat

logger = logging.getLogger(__name__)


class AdapterInstaller:
    def __init__(self, model: torch.nn.Module, vllm_config, device: torch.device) -> None:
        self.model, self.vllm_config, self.device = model, vllm_config, device
        self.offer: LoraOffer | None = None  # the adapter push being received
        self.staged: dict[str, torch.Tensor] = {}
        self.current = None  # the installed LoRAModel (put back after vLLM clears its adapters)
        self.install_s = 0.0

    @property
    def manager(self):
        return compat.lora_manager(self.model)

    def support(self) -> LoraSupport:
        """What this worker can do with an adapter, told the trainer when it joins."""
        packing = compat.packed_modules(self.model)
        manager = self.manager
        if manager is None:
            return LoraSupport(enabled=False, packing=packing)
        rank, slots, dtype = compat.lora_settings(self.vllm_config)
        return LoraSupport(True, rank, slots, compat.lora_modules(manager), packing, dtype)

    # --- one push ---------------------------------------------------------------------------------------------
    def begin(self, offer: LoraOffer | None) -> None:
        """Before the first batch of a push: an adapter push (``offer``), or None for any other."""
        self.offer = offer if offer is not None and offer.mode == "adapter" else None
        self.staged = {}
        if self.offer is not None and self.manager is None:
            raise RuntimeError("trainer_sync: an adapter push (SyncConfig(lora='adapter')) reached an engine started "
                               "without LoRA: start it with enable_lora=True")

    def wants(self, name: str) -> bool:
        return self.offer is not None and (".lora_A." in name or ".lora_B." in name)

    def take(self, name: str, tensor: torch.Tensor) -> None:
        """Keep one adapter tensor (a copy: the receiver reuses its buffers, and vLLM scales B in place)."""
        self.staged[name] = tensor.detach().to(self.device, copy=True)

    def finish(self) -> bool:
        """End of a push: install the staged adapter as the new version (True), or nothing to do (False)."""
        offer, staged = self.offer, self.staged
        self.offer, self.staged = None, {}
        if offer is None:
            return False
        if not staged:
            raise RuntimeError("trainer_sync: an adapter push carried no lora_A / lora_B tensor")
        t0 = time.perf_counter()
        manager = self.manager
        lora = compat.build_lora(manager, self.vllm_config, offer.id, staged, offer.config, self.device)
        compat.install_lora(manager, lora)
        self.current = lora
        compat.keep_lora_after_clear(manager, self._reinstall)
        self.install_s = time.perf_counter() - t0
        return True

    def abandon(self) -> None:
        """A failed push: drop what was staged; the installed version stays."""
        self.offer, self.staged = None, {}

    def _reinstall(self) -> None:
        if self.current is not None:
            compat.install_lora(self.manager, self.current)
