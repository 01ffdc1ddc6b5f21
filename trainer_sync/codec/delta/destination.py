"""Delta pushes, the receiving side's state (issue 16): the destination that holds the last version received.

A receiver takes deltas into a *destination* that holds exactly the last version it received:

* ``targets`` (``Receiver(..., targets={name: tensor})``): the served tensors themselves. Every push (full or delta)
  is written into them in place and ``on_batch`` sees the targets; a delta writes only the changed elements.
* otherwise a *mirror*: one wire-dtype copy of the model kept by the receiver (capped by the trainer's
  ``SyncConfig.delta_mirror_mb``), for engines that take whole tensors and re-process them (vLLM's layerwise
  reload): the delta is applied to the mirror and ``on_batch`` gets whole tensors from it, as after a full push.
* or targets adopted at run time (``adopts_targets``): the engine hands over its served tensors once it can
  (``adopt_targets``) and may take them back (``drop_targets``); until then pushes go full. A worker of a TP engine
  hands over ``Shards`` instead (shards.py): the parts of each tensor it serves.

What the destination holds (``state``) is what the receiver tells trainer rank 0 when it joins and with every
acknowledgement (protocol/delta.py ``DeltaState``); ``publish`` (set by the Receiver) writes a changed state to its
join key at once. The delta codec (codec.py) writes into ``dest`` during a push, full or delta.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...plan.buckets import BucketPlan, dtype_of
from ...plan.delta_policy import plan_digest
from ...protocol.delta import DeltaState
from .checksums import DeltaError
from .shards import Shards


class DeltaDestination:
    def __init__(self, mode: str, mirror_cap_bytes: int | None, targets: dict | None, device: torch.device,
                 adopts_targets: bool = False):
        _check_targets(targets)
        self.mode, self.cap, self.targets, self.device = mode, mirror_cap_bytes, targets, device
        # ``adopts_targets``: no mirror; the engine hands over its served tensors later (``adopt_targets``, e.g. once
        # vLLM's fast path is proven) and may take them back (``drop_targets``). Until then pushes go full.
        self.adopts = adopts_targets and targets is None
        self.may_adopt = self.adopts  # targets may still come: worth the trainer caching its pushes meanwhile
        self.dest: dict[str, torch.Tensor] | Shards | None = None  # plan tensor name -> flat destination, or shards
        self.canon: dict[str, str] = {}
        self.plan: BucketPlan | None = None  # the plan of the last push (adopted targets are bound to it)
        self.digest: str | None = None
        self.version: int | None = None  # the version ``dest`` holds whole (None: none)
        self.why = "it has no delta targets yet (the engine adopts them once it can)" if self.adopts else ""
        self.written: set[str] = set()
        self.tensors: set[str] = set()
        self.ipc: bool | None = None  # set by the Receiver at connect: CUDA IPC hops take full pushes only
        self.publish: Callable[[DeltaState], None] | None = None  # writes a changed state to the receiver's join key

    def told(self) -> DeltaState:
        """The state this receiver tells trainer rank 0 (at its join, with its acknowledgements)."""
        return absent_state(self.mode, True) if self.ipc else self.state()

    def takes_adopted(self) -> bool:
        """Whether targets can be adopted now (``adopts_targets``, connected, no CUDA IPC hop: those go full)."""
        return self.adopts and self.ipc is False

    def offer(self, targets: dict[str, torch.Tensor], version: int | None) -> bool:
        """The engine offers its served tensors (holding ``version``): adopt them if this receiver takes adopted
        targets, and say so at once (``publish``). Returns whether targets are held now."""
        if not self.takes_adopted():
            return False
        if self.adopt_targets(targets, version) and self.publish is not None:
            self.publish(self.told())
        return self.targets is not None

    def withdraw(self, why: str, for_good: bool = False) -> None:
        """The engine takes its tensors back (``drop_targets``), saying so at once."""
        if self.takes_adopted() and self.drop_targets(why, for_good) and self.publish is not None:
            self.publish(self.told())

    def state(self) -> DeltaState:
        """What this receiver holds, and whether it can take deltas at all (before its first push: it will have a
        destination; ``why`` says otherwise). A receiver that adopts targets says ``late``: its state can change
        after its acknowledgement (when the engine adopts or drops targets), so trainer rank 0 reads it again from
        the receiver's join key before deciding the next push."""
        if self.mode == "off":
            return DeltaState(self.digest, self.version, False, "delta off")
        if self.adopts and self.targets is None:
            return DeltaState(self.digest, None, bool(self.may_adopt), self.why, late=True)
        return DeltaState(self.digest, self.version, not self.why, self.why, late=bool(self.adopts))

    def prepare(self, plan: BucketPlan, plan_json: str) -> None:
        """Before a push of ``plan``: the destination for it (a new plan: nothing held yet)."""
        self.written = set()
        self.version = None  # until this push completes: a failed push leaves the destination half written
        self.plan = plan
        digest = plan_digest(plan_json)
        if digest == self.digest:
            return
        self.digest, self.version, self.dest = digest, None, None
        self.canon = {a: t.name for t in plan.tensors.values() for a in (t.name, *t.aliases)}
        self.tensors = set(plan.tensors)
        if self.adopts:
            if self.targets is not None:  # adopted for another plan: bind again, or give them back
                try:
                    self.dest, self.why = self._bind_targets(plan), ""
                except DeltaError as e:
                    self.drop_targets(str(e), for_good=True)
            return
        self.why = ""
        if self.targets is not None:
            self.dest = self._bind_targets(plan)
            return
        need = sum(t.numel * dtype_of(t.dtype).itemsize for t in plan.tensors.values())
        if self.cap is not None and need > self.cap:
            self.why = (f"its mirror of the model would need {need / 2**20:.1f} MiB, over delta_mirror_mb="
                        f"{self.cap / 2**20:g}")
            return
        self.dest = {t.name: torch.empty(t.numel, dtype=dtype_of(t.dtype), device=self.device)
                     for t in plan.tensors.values()}

    # --- targets adopted at run time (adopts_targets) -----------------------------------------------------------
    def adopt_targets(self, targets: dict[str, torch.Tensor], version: int | None) -> bool:
        """Make ``targets`` (the served tensors, holding exactly ``version`` of the last push's plan) the
        destination from the next push on. Returns whether the state changed. Targets that do not match the plan
        are not adopted: the receiver says why and keeps taking full pushes (never an error: the engine's choice)."""
        if not self.adopts:
            raise ValueError("trainer_sync: adopt_targets on a receiver made without adopts_targets=True")
        if targets is self.targets and version == self.version:
            return False
        before = self.state()
        try:
            _check_targets(targets)
            if self.plan is None:
                raise DeltaError("trainer_sync: Receiver targets are adopted after a push (they are bound to the "
                                   "trainer's plan), none was received yet")
            self.targets = targets
            self.dest, self.version, self.why, self.may_adopt = self._bind_targets(self.plan), version, "", True
        except (DeltaError, TypeError, ValueError) as e:
            self.targets = None
            self.drop_targets(str(e), for_good=True)
        return self.state() != before

    def drop_targets(self, why: str, for_good: bool = False) -> bool:
        """Stop writing into the adopted targets (the engine is about to change them some other way, or cannot
        offer any): pushes go full, saying ``why``. ``for_good``: no targets are expected any more, so the trainer
        stops caching pushes for this receiver. Returns whether the state changed."""
        if not self.adopts:
            raise ValueError("trainer_sync: drop_targets on a receiver made without adopts_targets=True")
        before = self.state()
        self.targets, self.dest, self.version, self.why, self.may_adopt = None, None, None, why, not for_good
        return self.state() != before

    def _bind_targets(self, plan: BucketPlan) -> dict[str, torch.Tensor] | Shards:
        if isinstance(self.targets, Shards):
            return self.targets.bound(plan, self.canon)
        dest, errors = {}, []
        known = set(self.canon)
        extra = sorted(set(self.targets) - known)
        if extra:
            errors.append(f"targets the trainer does not send: {extra}")
        for t in plan.tensors.values():
            name = next((n for n in (t.name, *t.aliases) if n in self.targets), None)
            if name is None:
                errors.append(f"no target for {t.name}")
                continue
            x, wire = self.targets[name], dtype_of(t.dtype)
            if x.numel() != t.numel or x.dtype != wire:
                errors.append(f"target {name} is {list(x.shape)} {str(x.dtype).replace('torch.', '')}, the trainer "
                              f"sends {list(t.shape)} {t.dtype}")
                continue
            dest[t.name] = x.view(-1)
        if errors:
            raise DeltaError("trainer_sync: Receiver targets do not match the trainer's tensors: " +
                               "; ".join(errors))
        return dest

    def finished(self, version: int, complete: bool = False) -> None:
        """After a push of ``version``: the destination holds it whole when every tensor was written."""
        whole = self.dest is not None and (complete or self.written >= self.tensors)
        self.version = version if whole else None
        if self.dest is not None and not whole and not self.why:
            self.why = "it receives only part of the plan's tensors"


def _check_targets(targets: dict | Shards | None) -> None:
    if targets is None or isinstance(targets, Shards):
        return
    if not isinstance(targets, dict) or not all(isinstance(t, torch.Tensor) for t in targets.values()):
        raise TypeError("trainer_sync: Receiver targets must be a dict of tensor name -> torch.Tensor")
    bad = [n for n, t in targets.items() if not t.is_contiguous()]
    if bad:
        raise ValueError(f"trainer_sync: Receiver targets must be contiguous (written in place): {bad}")


def absent_state(mode: str, ipc: bool) -> DeltaState:
    """The delta state of a receiver without a destination (delta off, no mirror, or CUDA IPC: those go full)."""
    return DeltaState(None, None, False, "CUDA IPC" if ipc else "delta off" if mode == "off"
                      else "it keeps no delta mirror")
