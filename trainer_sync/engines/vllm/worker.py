"""Worker-side apply: how received tensors get into the live vLLM model of one worker.

Two paths, chosen per push:
  * vLLM's layerwise reload (the general path): ``initialize_layerwise_reload`` at the first batch of a push,
    ``model.load_weights`` per batch, ``finalize_layerwise_reload`` at finish. vLLM repacks or quantizes weights
    after loading (on CPU for oneDNN), so checkpoint-format tensors can only be applied through this path, never by
    ``load_weights`` into the live model.
  * the fast path (placement.py): once the placement of every checkpoint tensor is proven on one layerwise push,
    one batched copy straight into each tensor's slice of its parameter.

Knows nothing of the bridging group or the trainer: backend.py hands it whole tensors (``apply``) and asks it where
deltas may be written (``delta_targets``).
"""
from __future__ import annotations

import logging

import torch

from . import compat
from .placement import DirectApply
from .shards import Piece, held_pieces

logger = logging.getLogger(__name__)


def tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that hold a parameter object another module holds too (a tied embedding / LM head)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    return [m for mods in owners.values() if len(mods) > 1 for m in mods]


class WeightApplier:
    """Applies pushes to one worker's model: layerwise reload, or the fast path once proven."""

    def __init__(self, model: torch.nn.Module, model_config, device: torch.device) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.reloading = False  # layerwise reload initialized on this worker and not yet finalized
        self.touched = False  # a weight of the current update was applied here
        self.tied = tied_modules(model)
        # The fast apply path (placement.py): off when the trainer asks for the layerwise path (JoinInfo.apply).
        self.direct = DirectApply(model, device)

    @property
    def how(self) -> str:
        """How the next batch will be applied: ``"direct"`` (fast path) or ``"layerwise"``."""
        return "direct" if self.direct.armed else "layerwise"

    def enable_direct(self, on: bool) -> None:
        self.direct.enable(on)

    def prepare(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Before the first batch of a push: let the fast path learn where the tensors go (once)."""
        self.direct.prepare(shapes)

    def delta_targets(self) -> tuple[dict[str, torch.Tensor] | None, str, bool]:
        """``(targets, why_not, for_good)``: the whole parameter slices a delta may be written into (the fast path
        is armed), else None, the reason, and whether the fast path will never offer them."""
        targets, why = self.direct.delta_targets()
        return targets, why, self.direct.armed or self.direct.why_not is not None

    def delta_pieces(self) -> tuple[dict[str, list[Piece]] | None, str, bool]:
        """For a worker of a TP > 1 engine: ``(pieces, why_not, for_good)``, the parts of each checkpoint tensor in
        this worker's parameters (shards.py) while the fast path is armed, else None and why (as delta_targets)."""
        d = self.direct
        if not d.armed:
            return None, f"its fast apply path is not armed ({d.why_not or 'not proven yet'})", d.why_not is not None
        held, why_not = held_pieces(d.slots, d.shapes)
        if why_not:
            name, why = next(iter(sorted(why_not.items())))
            return None, f"{len(why_not)} tensors have no place a delta can be written into ({name}: {why})", True
        return held, "", False

    def apply(self, batch: list[tuple[str, torch.Tensor | None]]) -> None:
        """Put one round of whole tensors into the model.

        Fast path, once proven for this model: one batched copy straight into each tensor's place. Otherwise vLLM's
        layerwise reload: it buffers a layer's tensors until its last one arrives, and the receiver reuses its
        buffers two rounds later, so each tensor is copied out first (once, even when tied names share it); the
        first such push also proves the fast path's placement. ``None`` for a tensor: the receiver wrote it in
        place already (a TP worker's shards, see shards.py).
        """
        self.touched = True
        batch = [(name, t) for name, t in batch if t is not None]
        if not batch:
            return
        if self.direct.armed:
            self.direct.apply(batch)
            return
        if not self.reloading:
            initialize, _, _ = compat.API.layerwise()
            compat.API.before_layerwise_reload(self.model, self.device)
            initialize(self.model)
            self.reloading = True
        copies: dict[int, torch.Tensor] = {}
        owned = []
        for name, t in batch:
            if id(t) not in copies:
                copies[id(t)] = t.clone()
            owned.append((name, copies[id(t)]))
        self.direct.observe(owned)
        self.model.load_weights(owned)

    def finish(self) -> None:
        """End the push: finalize the layerwise reload (if one was open) and let it prove the fast path."""
        if self.finalize():
            self.direct.verify()

    def finalize(self) -> bool:
        """End a layerwise reload (True if one was open)."""
        if not self.reloading:
            return False
        _, finalize_layerwise_reload, LAYERWISE_INFO = compat.API.layerwise()

        self.reloading = False
        # A tied LM head receives nothing itself (its weight is the embedding's), so layerwise reload puts its
        # kernel tensors back unprocessed. On CPU its processing built a packed GEMM copy of the weight, which then
        # still holds the OLD embedding: the model would compute logits with stale weights. Re-run the processing
        # of such modules once the shared tensor is fresh (on GPU it is a no-op for unquantized heads).
        stale = [m for m in self.tied if (i := LAYERWISE_INFO.get(m)) is not None and i.can_load()
                 and i.load_numel == 0]
        finalize_layerwise_reload(self.model, self.model_config)
        for module in stale:
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        return True

    def reset(self) -> None:
        """After a failed push: drop the half-done layerwise reload, so that the next push starts clean."""
        try:
            self.finalize()
        except Exception:  # the push's own error is the one worth reporting
            logger.exception("trainer_sync: resetting the layerwise reload after a failed push failed too")
