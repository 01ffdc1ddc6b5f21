"""The overlapped sender and receiver loops over one BucketPlan.

Sender (one trainer rank): pack bucket k+1 into the free buffer while bucket k is on the wire (async broadcast).
Receiver: post the receives of round k, then hand round k-1 to the load callback while round k arrives.
With one buffer a side the same loops run the stages one after another (the memory-budget fallback).

Flow control needs no extra messages: a broadcast completes only when every receiver has posted its side, so a
sender can never run more than ``num_buffers`` buckets ahead of the slowest receiver.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .errors import Deadline, SyncError
from .plan import Bucket, BucketPlan, dtype_of
from .sources.base import Source

Batch = list[tuple[str, torch.Tensor]]


@dataclass
class StageTimes:
    pack: float = 0.0
    transfer: float = 0.0  # time spent waiting for the wire (not hidden behind packing / applying)
    apply: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside a push: a full collection in a process that imported torch and vLLM
    takes ~100 ms, more than a whole push of a small model. Garbage is collected after the push instead."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def broadcast_bucket(group, tensor: torch.Tensor):
    """Start one bucket's broadcast from the group's rank 0 (the trainer rank that owns the group)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


def wait_work(work, deadline: Deadline, what: str, who: str) -> None:
    """Wait for one bucket's Work within ``deadline``, polling ``deadline.check()`` when it can be aborted."""
    timeout_s = deadline.left(what, "transfer", who)
    if deadline.abort is not None and not work.is_completed():
        # Poll instead of blocking, asking every few ms whether another member gave up (Deadline.check).
        end, pause, asked = time.monotonic() + timeout_s, 2e-5, time.monotonic()
        while not work.is_completed():
            now = time.monotonic()
            if now - asked >= Deadline.POLL_S:
                deadline.check()
                asked = now
            if now >= end:
                raise SyncError(f"{what} timed out after {timeout_s:g}s ({who})", stage="transfer", who=who)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
    try:
        ok = work.wait(timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - gloo/nccl raise plain RuntimeErrors without context
        raise SyncError(f"{what} failed or timed out after {timeout_s:g}s ({who}): {e}", stage="transfer",
                        who=who) from e
    if ok is False:
        raise SyncError(f"{what} timed out after {timeout_s:g}s ({who})", stage="transfer", who=who)


class BufferPool:
    """Reusable byte buffers, grown only when a plan needs bigger ones (so steady-state pushes allocate nothing)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []

    def get(self, count: int, nbytes: int) -> list[torch.Tensor]:
        if len(self.buffers) != count or any(b.numel() < nbytes for b in self.buffers):
            self.buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device) for _ in range(count)]
        return self.buffers


def pack_bucket(bucket: Bucket, plan: BucketPlan, source: Source, starts: dict[str, int], buf: torch.Tensor) -> None:
    """Copy (and cast to the wire dtype) every slot of ``bucket`` into ``buf`` at its offset."""
    for s in bucket.slots:
        wire = dtype_of(plan.tensors[s.name].dtype)
        lo = s.start - starts[s.name]
        src = source.flat(s.name)[lo:lo + s.numel]
        buf[s.offset:s.offset + s.numel * wire.itemsize].view(wire).copy_(src)


def send(plan: BucketPlan, source: Source, group, pool: BufferPool, num_buffers: int, deadline: Deadline,
         on_packed: Callable[[Bucket, torch.Tensor], None] | None = None) -> StageTimes:
    """Send this trainer rank's buckets. Every trainer rank walks every round (ZeRO-3 gathers are collective).

    ``on_packed(bucket, bytes)`` sees every packed bucket while it is on the wire (the catch-up snapshot keeps a
    copy of it; see catchup.py)."""
    times = StageTimes()
    mine = plan.buckets_of(source.rank)
    starts = {p.name: p.start for p in source.pieces()}
    buffers = pool.get(num_buffers, plan.max_bucket_bytes)
    inflight: deque = deque()

    def retire() -> None:
        bucket, work = inflight.popleft()
        t = time.perf_counter()
        wait_work(work, deadline, f"bucket {bucket.index} (round {bucket.round})",
              f"trainer rank {source.rank} -> receivers")
        times.transfer += time.perf_counter() - t

    failure = None
    try:
        for rnd, names in enumerate(round_names(plan)):
            bucket = mine[rnd]
            if bucket is not None and len(inflight) == num_buffers:
                retire()  # its buffer is the one we are about to refill
            with source.gathering(names):
                if bucket is None:
                    continue
                t = time.perf_counter()
                buf = buffers[rnd % num_buffers]
                pack_bucket(bucket, plan, source, starts, buf)
                times.pack += time.perf_counter() - t
                inflight.append((bucket, broadcast_bucket(group, buf[:bucket.nbytes])))
                if on_packed is not None:
                    on_packed(bucket, buf[:bucket.nbytes])
        while inflight:
            retire()
    except SyncError as e:
        failure = (type(e), str(e), e.stage, e.who)
    if failure is not None:
        # Raised here, outside the handler, and with the in-flight work dropped: no traceback or exception context
        # keeps the failed Work (and with it the group's connections) alive, so closing the group right after
        # really disconnects the receivers and the live ones fail at once instead of at their own timeout.
        inflight.clear()
        raise failure[0](*failure[1:])
    return times


def round_names(plan: BucketPlan) -> list[list[str]]:
    """The tensor names of each round of ``plan``."""
    return [sorted({s.name for b in rnd for s in b.slots}) for rnd in plan.rounds()]


class Assembler:
    """Turns received slots into whole tensors. A tensor sent whole is handed out as a view of the receive buffer
    (no copy; valid until the callback returns); a sharded one is copied into a fresh tensor until complete."""

    def __init__(self, plan: BucketPlan, device: torch.device, wanted: set[str] | None):
        self.plan, self.device = plan, device
        self.partial: dict[str, tuple[torch.Tensor, int]] = {}
        self.wanted = wanted

    def names_for(self, name: str) -> list[str]:
        t = self.plan.tensors[name]
        if self.wanted is None:
            return [name]
        return [n for n in (name, *t.aliases) if n in self.wanted]

    def add(self, bucket: Bucket, buf: torch.Tensor) -> Batch:
        out: Batch = []
        for s in bucket.slots:
            t = self.plan.tensors[s.name]
            wire = dtype_of(t.dtype)
            data = buf[s.offset:s.offset + s.numel * wire.itemsize].view(wire)
            if s.numel == t.numel:
                full = data.view(t.shape)
            else:
                full, remaining = self.partial.get(s.name) or (torch.empty(t.numel, dtype=wire, device=self.device),
                                                               t.numel)
                full[s.start:s.start + s.numel].copy_(data)
                remaining -= s.numel
                if remaining:
                    self.partial[s.name] = (full, remaining)
                    continue
                self.partial.pop(s.name, None)
                full = full.view(t.shape)
            out.extend((n, full) for n in self.names_for(s.name))
        return out


def receive(plan: BucketPlan, groups: dict, pool: BufferPool, num_buffers: int, deadline: Deadline,
            on_batch: Callable[[Batch], None], wanted: set[str] | None, me: str,
            post: Callable[[Bucket, torch.Tensor], object] | None = None, local=None) -> StageTimes:
    """Receive every bucket of ``plan`` and hand whole tensors to ``on_batch``, one call per round.

    By default each bucket arrives by broadcast on its sender's group; ``post(bucket, buf)`` replaces that (the
    point-to-point catch-up posts a recv instead). ``local`` (an ``IpcReceiver``, transport/ipc.py) takes the buckets
    of the trainer ranks on this receiver's own GPU (``local.srcs``): they come by CUDA IPC, not over the wire, and
    are applied in their own round while that round's wire buckets are still arriving."""
    post = post or (lambda b, buf: broadcast_bucket(groups[b.src], buf))
    srcs = set(local.srcs) if local is not None else set()
    times = StageTimes()
    rounds = plan.rounds()
    per_round = max((sum(b.src not in srcs for b in r) for r in rounds), default=0)
    buffers = pool.get(num_buffers * per_round, plan.max_bucket_bytes)
    asm = Assembler(plan, pool.device, wanted)

    def apply_batch(batch: Batch) -> None:
        t = time.perf_counter()
        if batch:
            on_batch(batch)
        times.apply += time.perf_counter() - t

    def apply(posted) -> None:
        t = time.perf_counter()
        batch: Batch = []
        for bucket, buf, _ in posted:
            batch.extend(asm.add(bucket, buf))
        times.apply += time.perf_counter() - t
        apply_batch(batch)

    prev = None
    for rnd, buckets in enumerate(rounds):
        if prev is not None and num_buffers == 1:
            apply(prev)  # one buffer: it must be consumed before it is overwritten
            prev = None
        base = (rnd % num_buffers) * per_round
        posted = []
        for b in buckets:
            if b.src not in srcs:
                buf = buffers[base + len(posted)]
                posted.append((b, buf, post(b, buf[:b.nbytes])))
        if prev is not None:
            apply(prev)  # overlaps with this round's receives
        here = [b for b in buckets if b.src in srcs]
        if here:
            apply_batch(local.take(here, asm, times, me))
            local.consumed()  # its staged buffers may be re-packed once the copies just queued have run
        t = time.perf_counter()
        for b, _, work in posted:
            wait_work(work, deadline, f"bucket {b.index} (round {b.round})", f"trainer rank {b.src} -> {me}")
        times.transfer += time.perf_counter() - t
        prev = posted or None
    if prev is not None:
        apply(prev)
    if asm.partial:
        raise SyncError(f"{me}: tensors incomplete after the last bucket: {sorted(asm.partial)}", stage="transfer",
                        who=me)
    return times
