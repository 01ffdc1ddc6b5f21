"""Source: where the trainer's tensors come from, and which flat element range of each this rank can send.

A source answers three questions for the planner and the packer, and nothing else:
  * ``pieces()``: for each tensor, its global shape/dtype and the flat range this rank holds (plan input);
  * ``flat(name)``: a 1-D view of that range (what the packer copies from);
  * ``gathering(names)``: a context every trainer rank enters together around packing (ZeRO-3 gathers there).
"""
from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from ..plan.buckets import LocalPiece, dtype_name

# Wrappers that prefix parameter names: DDP / DeepSpeed ("module."), torch.compile ("_orig_mod."), FSDP1 and
# activation checkpointing. The receiver knows the bare model's names.
_WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    prev = None
    while prev != name:
        prev, name = name, _WRAPPER_PREFIXES.sub(r"\1", name)
    return name


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine / torch.compile wrappers (names are cleaned anyway; this avoids extra prefixes)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def trainer_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Source(ABC):
    """Base class: name bookkeeping shared by every source (cleaning, renaming, tied aliases)."""

    def __init__(self, model: torch.nn.Module, rename: dict[str, str] | None = None,
                 rank: int | None = None, world: int | None = None):
        self.model = unwrap(model)
        default_rank, default_world = trainer_rank_and_world()
        self.rank = default_rank if rank is None else rank
        self.world = default_world if world is None else world
        rename = rename or {}
        self.params: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}
        first_name: dict[int, str] = {}
        # remove_duplicate=False shows tied weights (embedding and lm_head): the tensor travels once, under its first
        # name, and the others ride along as aliases for receivers that expect them.
        for raw, p in self.model.named_parameters(remove_duplicate=False):
            name = rename.get(clean_name(raw), clean_name(raw))
            if id(p) in first_name:
                primary = first_name[id(p)]
                self.aliases[primary] = self.aliases.get(primary, ()) + (name,)
                continue
            first_name[id(p)] = name
            self.params[name] = p

    @property
    def device(self) -> torch.device:
        p = next(iter(self.params.values()), None)
        return p.device if p is not None else torch.device("cpu")

    @abstractmethod
    def pieces(self) -> list[LocalPiece]:
        """This rank's pieces, one or none per tensor."""

    @abstractmethod
    def flat(self, name: str) -> torch.Tensor:
        """1-D tensor of this rank's piece of ``name`` (element 0 = the piece's ``start``)."""

    def gathering(self, names: list[str]):
        """Entered by every trainer rank around packing a round; only ZeRO-3 needs it."""
        return contextlib.nullcontext()

    def live(self, name: str) -> torch.Tensor | None:
        """The live tensor that ``flat(name)`` views, shaped or flat (element 0 = this rank's piece's ``start``), or
        None where there is none to map (a transient gather, a quantized copy). CUDA IPC's direct path exports it."""
        p = self.params.get(name)
        if p is None:
            return None
        p = p.detach()
        return p.to_local() if hasattr(p, "to_local") else p

    def nonfinite(self) -> list[str]:
        """Names whose local data hold NaN or Inf (checked before a push when SyncConfig.check_finite)."""
        return [n for n in self.params
                if self.flat(n).is_floating_point() and not bool(torch.isfinite(self.flat(n)).all())]

    def _piece(self, name: str, shape, dtype, start: int, numel: int) -> LocalPiece:
        return LocalPiece(name, tuple(int(s) for s in shape), dtype_name(dtype), int(start), int(numel), self.rank)
