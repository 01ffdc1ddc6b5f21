"""The transport interface: how one bucket leaves a trainer rank and how it reaches a receiver.

The overlapped loops (pipeline.py) are the same whatever carries the bytes; what differs per kind is only where a
bucket's bytes are put, how its transfer starts and when its buffer may be reused. So a transport is a small object
the loops call per bucket, not a loop of its own (vLLM's ``weight_transfer/`` has one file per backend in the same
way; here the kinds are):

* ``wire.py``: the bridging groups (NCCL / gloo broadcast from the trainer rank to the receivers of its group).
* ``ipc_send.py`` / ``ipc_recv.py``: CUDA IPC to the receivers on the trainer rank's own GPU, the wire (above) to
  the others in the same push (the "mixed" layout of transport/layout.py); ``cuda.py`` and ``counters.py`` are the
  pieces they share.
* ``p2p.py``: point-to-point sends and receives on a two-member group (the catch-up of a joining engine).

Both sides live for one epoch (a ``connect``); ``begin`` is called once per push before the first bucket.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import Deadline
from ..plan.buckets import Bucket, BucketPlan

if TYPE_CHECKING:
    from ..pipeline.loops import Assembler
    from ..sources.base import Source

Batch = list[tuple[str, torch.Tensor]]


@dataclass
class StageTimes:
    pack: float = 0.0
    transfer: float = 0.0  # time spent waiting for the wire (not hidden behind packing / applying)
    apply: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class BufferPool:
    """Reusable byte buffers, grown only when a plan needs bigger ones (so steady-state pushes allocate nothing)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []

    def get(self, count: int, nbytes: int) -> list[torch.Tensor]:
        if len(self.buffers) != count or any(b.numel() < nbytes for b in self.buffers):
            self.buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device) for _ in range(count)]
        return self.buffers


class SendTransport(ABC):
    """One trainer rank's outgoing side for one epoch. ``pipeline.send`` packs each of this rank's buckets into
    ``buffer(...)`` and hands it to ``post(...)``; the transport decides where the bytes go and when a buffer is free.

    The loop calls, per push: ``begin`` once (False: this rank packs nothing this push), then per bucket
    ``make_room`` (before the round's gather), ``buffer``, ``packed``, ``post_frames`` (``post`` for one frame), and
    ``drain`` at the end; ``drop``
    when a bucket failed (the in-flight work must not outlive the error: see pipeline.send)."""

    #: Whether the packed buckets are what every receiver got (the catch-up snapshot keeps a copy of them). Not so
    #: where some receivers read the trainer's memory in place (CUDA IPC): then nothing complete is packed.
    serves_catchup = False

    def begin(self, push: str, plan: BucketPlan, source: "Source", num_buffers: int) -> bool:
        """Prepare push ``push`` (a ``Keys.push`` name); return whether the loop has anything to pack."""
        return True

    def make_room(self, bucket: Bucket, rnd: int, times: StageTimes, deadline: Deadline) -> None:
        """Before round ``rnd``'s gather: wait until a buffer for ``bucket`` can be handed out (default: at once)."""

    @abstractmethod
    def buffer(self, bucket: Bucket, rnd: int, times: StageTimes, deadline: Deadline) -> torch.Tensor:
        """The byte buffer to pack ``bucket`` into (at least ``bucket.nbytes``), once it may be overwritten."""

    def packed(self, bucket: Bucket, buf: torch.Tensor) -> None:
        """``bucket`` is packed into ``buf`` (counted as pack time: what makes the bytes visible goes here)."""

    @abstractmethod
    def post(self, bucket: Bucket, data: torch.Tensor) -> None:
        """Start the transfer of ``data`` (``buf[:bucket.nbytes]``)."""

    def post_frames(self, bucket: Bucket, frames: list[torch.Tensor]) -> None:
        """Start the transfer of ``bucket`` as the frames its codec made (codec/base.py), in order. One frame (a
        full push) is ``post``; a transport that carries several (a delta's header and body) overrides this."""
        if len(frames) != 1:
            raise NotImplementedError(f"{type(self).__name__} carries one frame per bucket (full pushes only)")
        self.post(bucket, frames[0])

    @abstractmethod
    def drain(self, times: StageTimes, deadline: Deadline) -> None:
        """Wait for every transfer this push started."""

    def drop(self) -> None:
        """Forget the in-flight transfers after a failure (no reference may keep a failed Work alive)."""

    def after_push(self) -> None:
        """Every receiver acknowledged the push."""

    def close(self) -> None:
        """The epoch ends: release what the transport holds."""


class RecvTransport(ABC):
    """One receiver's incoming side for one epoch. ``pipeline.receive`` gives every bucket from a trainer rank not
    in ``local_srcs`` a receive buffer and starts its transfer with ``post``; the buckets of the trainer ranks in
    ``local_srcs`` arrive without a buffer of ours (CUDA IPC: views of the trainer's memory) through ``take``."""

    #: Trainer ranks whose buckets this transport hands over itself (``take``), not through receive buffers.
    local_srcs: frozenset[int] = frozenset()
    #: Whether pipeline.receive should record this push's batches for ``remember`` (a later push may replay them).
    records_batches = False

    def begin(self, push: str, num_buffers: int) -> None:
        """Push ``push`` (a ``Keys.push`` name) is about to arrive."""

    @abstractmethod
    def post(self, bucket: Bucket, buf: torch.Tensor):
        """Start receiving ``bucket`` into ``buf``; returns its Work (``pipeline.wait_work`` waits for it)."""

    def take(self, buckets: list[Bucket], asm: "Assembler", times: StageTimes, me: str) -> Batch:
        """The tensors of this round's buckets from ``local_srcs`` (only called when there are any)."""
        raise NotImplementedError(f"{type(self).__name__} has no local trainer ranks")

    def consumed(self) -> None:
        """The copies out of the buckets ``take`` handed over are queued."""

    def replay(self, plan: BucketPlan) -> list[Batch] | None:
        """Batches of an earlier push that are still this push's tensors (views that did not move), or None."""
        return None

    def remember(self, plan: BucketPlan, batches: list[Batch]) -> None:
        """This push's batches, recorded because ``records_batches`` was set."""

    def finish(self, times: StageTimes) -> None:
        """After the last bucket, before the receiver acknowledges."""

    def close(self) -> None:
        """The epoch ends: release what the transport holds."""
