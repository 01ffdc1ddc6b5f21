"""CUDA IPC, trainer side: the transport when trainer ranks and receivers share one GPU (colocated / hybrid-engine RL).

Nothing goes through host memory, and nothing through NCCL (which refuses two ranks on one GPU). The bridging store
stays what it is for the rendezvous, the handshake and the acknowledgements; this transport adds the data path of the
hops that transport/layout.py calls local. With FSDP2 over several GPUs a trainer rank can have receivers on both
sides: ``IpcSend`` then feeds its group (``wire``) from the same push, and a receiver takes the other trainer ranks'
buckets from their groups in the same ``pipeline.receive`` loop (ipc_recv.py).

Two paths, picked per push by the trainer rank and announced in its manifest:

* ``direct`` (used whenever it applies): the receiver reads the trainer's parameters in place. The trainer exports
  the storage behind each tensor it sends (once: the export is kept for the epoch and re-used by every later push),
  the receiver maps each export once and hands views of it to ``on_batch``; the engine's own ``copy_`` into its
  weights is then the only copy of each byte: one device read and one write, which is what one flat
  device-to-device copy of the model costs (the floor). Applies when every piece this rank sends travels in the
  trainer's own dtype (no cast) and is a view of the live parameter (a contiguous plain / DDP / FSDP2-local tensor;
  not ZeRO-3, whose gathered tensors are transient). ``SyncConfig.ipc_direct=False`` turns it off. This rank packs
  nothing for its local receivers; the other GPUs' receivers, if any, get the ordinary wire push.
* ``staged`` (the rest: a cast to the wire dtype, ZeRO-3, non-contiguous parameters): the trainer packs each bucket
  on the device into one of ``num_buffers`` bucket buffers that it allocates and exports once for the epoch
  (double-buffered, re-used across pushes); the receiver maps them once and applies each bucket as it lands. Every
  byte is copied once on each side. The other GPUs' receivers get a broadcast of that very buffer (one pack for
  both transports).

Signalling, and why. The data never leaves the GPU, so the signals must not make either process wait for the GPU:
that would put a host round trip per bucket on the critical path. Both paths therefore order the GPU work with CUDA
IPC events (``torch.cuda.Event(interprocess=True)``): the trainer records "bucket ready" on its stream, the receiver's
stream waits on it (``cudaStreamWaitEvent``: a wait on the GPU, not on the host) before its copies, and for staged
buffers the receiver records "bucket consumed" that the trainer's stream waits on before re-packing that buffer. The
host side only has to say *that* an event has been recorded, and the host loops then run ahead of the GPU and keep
its queues full. For ``direct`` that is one manifest per push in the bridging store, which the handshake reads
anyway. For ``staged`` it is one counter per bucket in a small shared-memory file (counters.py): trainer and
receivers are on one host by definition of this transport, so a store to a mapped page reaches the other process in
microseconds. (The first version used a tiny gloo all-reduce per bucket on a control group of the epoch; on the H200
machine that cost 0.37 ms per bucket, 27 ms of a 50 ms push of 74 buckets, all of it host latency.) A receiver
synchronizes its device once at the end of a push, before it acknowledges, so a returned ``push()`` means the engine
holds the new weights and the trainer may overwrite its parameters and buffers.

Lifetimes. An export lives as long as the trainer keeps sending that storage: when a push no longer uses it (the
parameter was re-allocated, the buffers were resized) the receivers unmap it during that push and the trainer drops
it after the acknowledgements, then runs ``torch.cuda.ipc_collect()``; ``close()`` releases everything. So repeated
pushes allocate nothing and leave GPU memory where the first push left it, and closing both sides (receivers first,
or an ``ipc_collect()`` on the trainer after they closed) brings it back to where it was before ``connect()``.

The CUDA calls themselves, and the exports of this process, are in cuda.py.
"""
from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from ..errors import Deadline, SyncError
from ..plan.buckets import Bucket, BucketPlan, dtype_name
from ..protocol.messages import Keys
from . import cuda
from .base import SendTransport, StageTimes
from .counters import Counters
from .group import wait_keys
from .wire import WireSend, broadcast_bucket, wait_work


class IpcSend(SendTransport):
    """The trainer-rank side of one epoch, for the receivers on this rank's GPU (``local``); ``open_send``
    (transport/__init__.py) builds it when the layout gives this rank any. The receivers on other GPUs, if any, are
    reached through ``wire`` (this rank's group): in the direct path it carries the push as it would without IPC, in
    the staged path it broadcasts the very buffer the local receivers map."""

    def __init__(self, store: dist.Store, rank: int, local: tuple[int, ...], num_receivers: int,
                 device: torch.device, timeout_s: float, direct: bool = True, wire: WireSend | None = None):
        self.store, self.rank, self.local, self.num_receivers = store, rank, tuple(local), num_receivers
        self.device, self.timeout_s, self.allow_direct = device, timeout_s, direct
        self.who = f"trainer rank {rank} -> receivers (ipc)"
        self._next_id = 0
        self._ids: dict[tuple[int, int], int] = {}  # (storage ptr, nbytes) -> export id
        self._held: dict[int, torch.Tensor] = {}  # export id -> uint8 tensor over the exported storage
        self._handles: dict[int, list] = {}  # export id -> its export arguments
        self._new: dict[int, list] = {}  # exports the receivers have not seen yet
        self._stale: list[int] = []  # dropped after the acknowledgements of the push that stopped using them
        self._ready = None  # [(event, handle)] recorded by this rank
        self._free: dict[int, list] | None = None  # local receiver j -> its "consumed" events, one per buffer
        self._bufs: list[tuple[int, torch.Tensor]] = []
        self._counters: Counters | None = None
        self._announced = 0  # buckets announced this epoch (the receivers count the same way)
        self._direct_key = None  # (buckets, data ptrs) -> (slots, live) of the last direct push
        self.wire = wire  # this rank's group for the receivers on other GPUs (None: every receiver is on this GPU)
        self._direct = False  # the push in progress goes direct (else staged)
        self._nb, self._slot = 1, 0  # buffers of this push; the one the current bucket is packed into
        self._broadcasts: dict[int, tuple[Bucket, object]] = {}  # staged buffer -> its broadcast on ``wire``

    # ---- exports --------------------------------------------------------------------------------------------
    def _export(self, storage: torch.UntypedStorage) -> int:
        key = (storage.data_ptr(), storage.nbytes())
        eid = self._ids.get(key)
        if eid is None:
            base = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
            eid = self._next_id
            self._next_id += 1
            self._ids[key] = eid
            self._held[eid] = base
            self._new[eid] = self._handles[eid] = cuda.export(base)
        return eid

    def _release(self, live: set[int]) -> None:
        self._stale = [e for e in self._held if e not in live]

    def after_push(self) -> None:
        """Called once every receiver acknowledged: they have unmapped what this push stopped using."""
        if self._stale:
            for eid in self._stale:
                base = self._held.pop(eid)
                cuda.unexport(self._handles.pop(eid))
                self._ids.pop((base.untyped_storage().data_ptr(), base.untyped_storage().nbytes()), None)
            self._stale = []
            cuda.backend.collect()

    # ---- one push -------------------------------------------------------------------------------------------
    def _direct_slots(self, plan: BucketPlan, source, mine: list[Bucket]):
        """[[export id, byte offset] per slot] per bucket of this rank, or None when a piece cannot go direct."""
        if not self.allow_direct:
            return None
        backing = {}
        for b in mine:
            for s in b.slots:
                if s.name not in backing:
                    t = source.live(s.name)
                    if t is None or t.device != self.device or dtype_name(t.dtype) != plan.tensors[s.name].dtype \
                            or not t.is_contiguous():
                        return None
                    backing[s.name] = t
        key = (tuple(mine), tuple(t.data_ptr() for t in backing.values()))
        if self._direct_key is not None and self._direct_key[0] == key:
            return self._direct_key[1]
        starts = {p.name: p.start for p in source.pieces()}
        slots, live = [], set()
        for b in mine:
            row = []
            for s in b.slots:
                t = backing[s.name]
                lo = s.start - starts[s.name]
                if s.numel == 0:
                    row.append([-1, 0])  # an empty tensor: nothing to map
                    continue
                eid = self._export(t.untyped_storage())
                row.append([eid, (t.storage_offset() + lo) * t.element_size()])
                live.add(eid)
            slots.append(row)
        self._direct_key = (key, (slots, live))
        return slots, live

    def _events(self) -> list:
        if self._ready is None:
            self._ready = [cuda.new_event(self.device) for _ in range(cuda.NUM_EVENTS)]
        return self._ready

    def begin(self, push: str, plan: BucketPlan, source, num_buffers: int) -> bool:
        """Pick direct or staged for this push and publish the manifest the local receivers read. Packs nothing
        (returns False) when the push goes direct and every receiver is on this GPU."""
        mine = [b for b in plan.buckets_of(self.rank) if b is not None]
        ready = self._events()
        direct = self._direct_slots(plan, source, mine)
        manifest = {"events": [h for _, h in ready], "nb": num_buffers}
        if direct is not None:
            slots, live = direct
            cuda.backend.record(ready[0][0], self.device)  # everything the trainer wrote so far is in their view
            manifest.update(kind="direct", slots=slots)
        else:
            self._direct_key = None
            need = max(plan.max_bucket_bytes, 1)
            if len(self._bufs) != num_buffers or any(b.numel() < need for _, b in self._bufs):
                self._bufs = []  # the old ones go stale (released after this push)
                for _ in range(num_buffers):
                    buf = cuda.backend.alloc(need, self.device)
                    self._bufs.append((self._export(buf.untyped_storage()), buf))
            live = {eid for eid, _ in self._bufs}
            if self._counters is None:
                self._counters = Counters.create(1 + self.num_receivers)
            manifest.update(kind="staged", bufs=[eid for eid, _ in self._bufs], counters=self._counters.path,
                            start=self._announced)
        self._release(live)
        manifest.update(new={str(k): v for k, v in self._new.items()}, live=sorted(live))
        # Plain JSON, not a protocol message: transport-internal (this module and ipc_recv.py, one release on one GPU).
        self.store.set(Keys.ipc(push, self.rank), json.dumps(manifest, separators=(",", ":")))
        self._new = {}
        self._direct, self._nb = direct is not None, num_buffers
        if self._direct:  # the local receivers read in place; the others (if any) get the ordinary wire push
            return self.wire is not None and self.wire.begin(push, plan, source, num_buffers)
        if self._free is None:
            keys = [f"ipc/free{self.rank}/{j}" for j in self.local]
            if wait_keys(self.store, keys, self.timeout_s):
                raise SyncError(f"{self.who}: receivers published no IPC events", stage="transfer", who=self.who)
            self._free = {j: [cuda.open_event(h, self.device) for h in json.loads(self.store.get(k))]
                          for j, k in zip(self.local, keys)}
        self._broadcasts = {}
        return True

    # ---- the loop's calls (pipeline.send): the wire's in the direct path, the shared buffers' in the staged one --
    def make_room(self, bucket, rnd, times, deadline) -> None:
        if self._direct:
            self.wire.make_room(bucket, rnd, times, deadline)

    def buffer(self, bucket: Bucket, rnd: int, times: StageTimes, deadline: Deadline) -> torch.Tensor:
        if self._direct:
            return self.wire.buffer(bucket, rnd, times, deadline)
        g, nb = self._announced, self._nb  # g: this bucket's number in the epoch
        s = g % nb
        t = time.perf_counter()
        if s in self._broadcasts:  # the wire must be done with the buffer too
            b, work = self._broadcasts.pop(s)
            wait_work(work, deadline, f"bucket {b.index} (round {b.round})", self.who)
        if g >= nb:  # buffer s last held bucket g - nb: every local receiver must have queued its copies
            what = f"ipc buffer {s} for bucket {bucket.index}"
            for j in self.local:
                self._counters.wait(1 + j, g - nb + 1, self.timeout_s, what, f"receiver {j}", deadline)
            for evs in self._free.values():
                cuda.backend.wait(evs[s], self.device)  # ...and the GPU waits until those copies ran
        times.transfer += time.perf_counter() - t
        self._slot = s
        return self._bufs[s][1]

    def packed(self, bucket: Bucket, buf: torch.Tensor) -> None:
        if self._direct:
            return
        g = self._announced
        cuda.backend.record(self._ready[self._slot][0], self.device)
        self._counters.v[0] = g + 1  # announce: its "ready" event is recorded
        self._announced = g + 1

    def post(self, bucket: Bucket, data: torch.Tensor) -> None:
        if self._direct:
            self.wire.post(bucket, data)
        elif self.wire is not None:
            self._broadcasts[self._slot] = (bucket, broadcast_bucket(self.wire.group, data))

    def drain(self, times: StageTimes, deadline: Deadline) -> None:
        if self._direct:
            self.wire.drain(times, deadline)
            return
        t = time.perf_counter()
        for b, work in self._broadcasts.values():
            wait_work(work, deadline, f"bucket {b.index} (round {b.round})", self.who)
        self._broadcasts = {}
        times.transfer += time.perf_counter() - t

    def drop(self) -> None:
        self._broadcasts = {}
        if self.wire is not None:
            self.wire.drop()

    def close(self) -> None:
        if self._counters is not None:
            self._counters.close()
            self._counters = None
        self._direct_key = None
        self._broadcasts = {}
        for w in self._handles.values():
            cuda.unexport(w)
        cuda.forget_events(self._ready)
        self._bufs, self._held, self._ids, self._new, self._handles = [], {}, {}, {}, {}
        self._ready, self._free, self._stale = None, None, []
        if self.wire is not None:
            self.wire.close()
        if cuda.backend.available(self.device):
            cuda.backend.collect()
