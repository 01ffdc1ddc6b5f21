"""The wire: buckets broadcast over the bridging groups (transport/group.py), NCCL between GPUs, gloo on CPU.

Trainer rank r is rank 0 of its group ``src{r}`` and broadcasts each of its buckets to the receivers in it; a
receiver posts one broadcast receive per bucket on the group of the bucket's trainer rank. Flow control needs no
extra messages: a broadcast completes only when every receiver has posted its side, so a sender can never run more
than ``num_buffers`` buckets ahead of the slowest receiver.
"""
from __future__ import annotations

import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import Deadline, SyncError
from ..plan.buckets import Bucket
from .base import BufferPool, RecvTransport, SendTransport, StageTimes


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
    except Exception as e:  # gloo/nccl raise plain RuntimeErrors without context
        raise SyncError(f"{what} failed or timed out after {timeout_s:g}s ({who}): {e}", stage="transfer",
                        who=who) from e
    if ok is False:
        raise SyncError(f"{what} timed out after {timeout_s:g}s ({who})", stage="transfer", who=who)


class WireSend(SendTransport):
    """This trainer rank's buckets, broadcast on its group from ``num_buffers`` pool buffers: bucket k+1 is packed
    into the free buffer while bucket k is on the wire."""

    serves_catchup = True

    def __init__(self, group, pool: BufferPool, rank: int):
        self.group, self.pool, self.who = group, pool, f"trainer rank {rank} -> receivers"
        self._buffers: list[torch.Tensor] = []
        self._inflight: deque = deque()  # (bucket, its Works, its frames), oldest first

    def begin(self, push, plan, source, num_buffers) -> bool:
        self._buffers = self.pool.get(num_buffers, plan.max_bucket_bytes)
        return True

    def make_room(self, bucket, rnd, times, deadline) -> None:
        if len(self._inflight) == len(self._buffers):
            self._retire(times, deadline)  # its buffer is the one we are about to refill

    def buffer(self, bucket, rnd, times, deadline) -> torch.Tensor:
        return self._buffers[rnd % len(self._buffers)]

    def post(self, bucket: Bucket, data: torch.Tensor) -> None:
        self.post_frames(bucket, [data])

    def post_frames(self, bucket: Bucket, frames: list[torch.Tensor]) -> None:
        """One broadcast per frame, in order (the frames stay referenced until their Works completed)."""
        self._inflight.append((bucket, [broadcast_bucket(self.group, f) for f in frames], frames))

    def drain(self, times, deadline) -> None:
        while self._inflight:
            self._retire(times, deadline)

    def drop(self) -> None:
        self._inflight.clear()

    def _retire(self, times: StageTimes, deadline: Deadline) -> None:
        bucket, works, _ = self._inflight.popleft()
        t = time.perf_counter()
        for work in works:
            wait_work(work, deadline, f"bucket {bucket.index} (round {bucket.round})", self.who)
        times.transfer += time.perf_counter() - t

    def close(self) -> None:
        self._inflight.clear()
        self.group = None


class WireRecv(RecvTransport):
    """Every bucket by broadcast on the group of its trainer rank (``groups``: trainer rank -> group)."""

    def __init__(self, groups: dict):
        self.groups = groups

    def post(self, bucket: Bucket, buf: torch.Tensor):
        return broadcast_bucket(self.groups[bucket.src], buf)

    def close(self) -> None:
        self.groups = {}
