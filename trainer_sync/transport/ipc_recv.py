"""CUDA IPC, receiver side: the buckets of the trainer ranks on this receiver's GPU, mapped instead of received.

The protocol (direct and staged paths, the events and counters, lifetimes) is described in ipc_send.py. This side
reads each push's manifests, maps what is new, hands the local buckets to ``pipeline.receive`` through ``take``, and
gives the buckets of the other GPUs' trainer ranks, if any, to the wire (``post``: a broadcast on their groups) in
the same loop. A push that is all direct, with nothing assembled and nothing from the wire, is remembered: the next
push with the same plan over the same storages replays the very same views (``replay``) without a loop at all.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from ..errors import SyncError
from ..plan.buckets import Bucket, BucketPlan
from ..protocol.messages import Keys
from . import cuda
from .base import Batch, RecvTransport, StageTimes
from .counters import Counters
from .group import Member, wait_keys
from .wire import broadcast_bucket


class IpcRecv(RecvTransport):
    """The receiver side of one epoch, for the trainer ranks on this receiver's GPU (``srcs``); the others, if any,
    broadcast on their groups (``groups``: trainer rank -> group, empty when every trainer rank is on this GPU)."""

    def __init__(self, store: dist.Store, me: Member, srcs: tuple[int, ...], num_receivers: int,
                 device: torch.device, timeout_s: float, groups: dict | None = None):
        self.store, self.me, self.device, self.timeout_s = store, me, device, timeout_s
        self.srcs, self.num_receivers = tuple(srcs), num_receivers
        self.local_srcs = frozenset(self.srcs)
        self.groups = groups or {}
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}  # (trainer rank, export id) -> uint8 view
        self._events: dict[str, object] = {}  # handle -> opened event
        self._free: dict[int, list] = {}  # trainer rank -> [(event, handle)] this receiver records
        self._counters: dict[str, Counters] = {}
        self._consumed: dict[int, int] = {}  # trainer rank -> its buckets consumed this epoch
        self._cache = None  # (buckets, slots) -> batches of the last all-direct push
        self._key = None  # this push's (buckets, slots)
        self._empty = torch.empty(0, dtype=torch.uint8, device=device)
        self._man: dict[int, dict] = {}
        self._nb = 1
        self._index: dict[int, int] = {}  # trainer rank -> its buckets taken this push
        self._waited: set[int] = set()
        self._staged: list[tuple[int, int, str]] = []  # (trainer rank, bucket number, counters) of this round
        self.reusable = True  # this push's batches can be replayed next push (all direct, nothing assembled)

    def _manifests(self, p: str) -> dict[int, dict]:
        keys = [Keys.ipc(p, r) for r in self.srcs]
        missing = wait_keys(self.store, keys, self.timeout_s)
        if missing:
            raise SyncError(f"{self.me}: no IPC manifest from {', '.join(missing)} within {self.timeout_s:g}s",
                            stage="transfer", who="trainer")
        # Plain JSON, not a protocol message: transport-internal (ipc_send.py's manifest, one release on one GPU).
        return {r: json.loads(self.store.get(k)) for r, k in zip(self.srcs, keys)}

    def begin(self, p: str, num_buffers: int) -> None:
        """Read this push's manifests; unmap what the trainer ranks no longer send, map what is new."""
        self._man = man = self._manifests(p)
        self._nb, self._index, self._waited, self.reusable = num_buffers, {r: 0 for r in man}, set(), True
        for r, m in man.items():
            live = set(m["live"])
            for k in [k for k in self._mapped if k[0] == r and k[1] not in live]:
                del self._mapped[k]
            for eid, w in m["new"].items():
                self._mapped[(r, int(eid))] = cuda.open_export(w, self.device)
            for h in m["events"]:
                if h not in self._events:
                    self._events[h] = cuda.open_event(h, self.device)
            if m["kind"] == "staged":
                self.reusable = False
                if r not in self._free:
                    self._free[r] = [cuda.new_event(self.device) for _ in range(cuda.NUM_EVENTS)]
                    # The event handles as plain JSON: transport-internal, like the manifest.
                    self.store.set(f"ipc/free{r}/{self.me.rank}", json.dumps([h for _, h in self._free[r]]))
                if m["counters"] not in self._counters:
                    self._counters[m["counters"]] = Counters(m["counters"], 1 + self.num_receivers, create=False)
                if self._consumed.get(r, 0) != m["start"]:
                    raise SyncError(f"{self.me}: lost count of trainer rank {r}'s buckets ({self._consumed.get(r, 0)}"
                                    f" consumed, it announces from {m['start']})", stage="transfer", who=str(self.me))

    def take(self, buckets: list[Bucket], asm, times: StageTimes, me: str) -> Batch:
        """The tensors of this round's buckets from local trainer ranks (views of their memory where whole)."""
        batch: Batch = []
        for b in buckets:
            m, i = self._man[b.src], self._index[b.src]
            if m["kind"] == "direct":
                if b.src not in self._waited:
                    cuda.backend.wait(self._events[m["events"][0]], self.device)
                    self._waited.add(b.src)
                for s, (eid, off) in zip(b.slots, m["slots"][i]):
                    one = Bucket(b.index, b.src, b.round, b.nbytes, (replace(s, offset=off),))
                    data = self._mapped[(b.src, eid)] if eid >= 0 else self._empty
                    batch.extend(asm.add(one, data))
                    if s.numel != asm.plan.tensors[s.name].numel:
                        self.reusable = False  # assembled into fresh tensors: cannot be re-used next push
            else:
                g = self._consumed[b.src] = self._consumed.get(b.src, 0)
                t = time.perf_counter()
                self._counters[m["counters"]].wait(0, g + 1, self.timeout_s, f"ipc bucket {b.index}",
                                                   f"trainer rank {b.src} -> {me}")
                times.transfer += time.perf_counter() - t
                cuda.backend.wait(self._events[m["events"][g % self._nb]], self.device)
                batch.extend(asm.add(b, self._mapped[(b.src, m["bufs"][g % self._nb])]))
                self._staged.append((b.src, g, m["counters"]))
                self._consumed[b.src] = g + 1
            self._index[b.src] = i + 1
        return batch

    def consumed(self) -> None:
        """The copies out of this round's staged buffers are queued: let their trainer ranks re-pack them."""
        for src, g, path in self._staged:
            cuda.backend.record(self._free[src][g % self._nb][0], self.device)
            self._counters[path].v[1 + self.me.rank] = g + 1  # its "consumed" event is recorded
        self._staged = []

    # ---- the loop's calls (pipeline.receive) -------------------------------------------------------------------
    def post(self, bucket: Bucket, buf: torch.Tensor):
        return broadcast_bucket(self.groups[bucket.src], buf)  # a trainer rank on another GPU: over its group

    @property
    def records_batches(self) -> bool:
        return not self.groups  # replayable only when nothing comes over the wire

    def replay(self, plan: BucketPlan) -> list[Batch] | None:
        """Same plan, same storages as the last all-direct push: the views from last time are still right."""
        self._key = key = (plan.buckets, tuple(json.dumps(m.get("slots")) for m in self._man.values()))
        if self._cache is not None and (self.groups or not self.reusable or self._cache[0] != key):
            self._cache = None
        if self._cache is None:
            return None
        for m in self._man.values():
            cuda.backend.wait(self._events[m["events"][0]], self.device)
        return self._cache[1]

    def remember(self, plan: BucketPlan, batches: list[Batch]) -> None:
        if self.reusable and not self.groups:
            self._cache = (self._key, batches)

    def finish(self, times: StageTimes) -> None:
        t = time.perf_counter()
        cuda.backend.synchronize(self.device)  # the engine holds the new weights (and reads no trainer memory)
        times.transfer += time.perf_counter() - t  # before anyone acknowledges

    def close(self) -> None:
        for c in self._counters.values():
            c.close()
        for pairs in self._free.values():
            cuda.forget_events(pairs)
        self._counters, self._cache, self._mapped, self._events, self._free = {}, None, {}, {}, {}
        self.groups = {}
