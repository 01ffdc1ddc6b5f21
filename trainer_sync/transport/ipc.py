"""CUDA IPC: the transport when trainer ranks and receivers share one GPU (colocated / hybrid-engine RL).

Nothing goes through host memory, and nothing through NCCL (which refuses two ranks on one GPU). The bridging store
stays what it is for the rendezvous, the handshake and the acknowledgements; this module adds the data path of the
hops that transport/layout.py calls local. With FSDP2 over several GPUs a receiver also has remote hops: it takes
those buckets from the other trainer ranks' groups in the same ``pipeline.receive`` loop (``IpcReceiver`` is its
``local`` hook), and a trainer rank with receivers on both sides feeds its group from the same push (see
``IpcSender``).

Two paths, picked per push by the trainer rank and announced in its manifest:

* ``direct`` (used whenever it applies): the receiver reads the trainer's parameters in place. The trainer exports
  the storage behind each tensor it sends (once: the export is kept for the epoch and re-used by every later push),
  the receiver maps each export once and hands views of it to ``on_batch``; the engine's own ``copy_`` into its
  weights is then the only copy of each byte: one device read and one write, which is what one flat
  device-to-device copy of the model costs (the floor). Applies when every piece this rank sends travels in the
  trainer's own dtype (no cast) and is a view of the live parameter (a contiguous plain / DDP / FSDP2-local tensor;
  not ZeRO-3, whose gathered tensors are transient). ``SyncConfig.ipc_direct=False`` turns it off.
* ``staged`` (the rest: a cast to the wire dtype, ZeRO-3, non-contiguous parameters): the trainer packs each bucket
  on the device into one of ``num_buffers`` bucket buffers that it allocates and exports once for the epoch
  (double-buffered, re-used across pushes); the receiver maps them once and applies each bucket as it lands. Every
  byte is copied once on each side.

Signalling, and why. The data never leaves the GPU, so the signals must not make either process wait for the GPU:
that would put a host round trip per bucket on the critical path. Both paths therefore order the GPU work with CUDA
IPC events (``torch.cuda.Event(interprocess=True)``): the trainer records "bucket ready" on its stream, the receiver's
stream waits on it (``cudaStreamWaitEvent``: a wait on the GPU, not on the host) before its copies, and for staged
buffers the receiver records "bucket consumed" that the trainer's stream waits on before re-packing that buffer. The
host side only has to say *that* an event has been recorded, and the host loops then run ahead of the GPU and keep
its queues full. For ``direct`` that is one manifest per push in the bridging store, which the handshake reads
anyway. For ``staged`` it is one counter per bucket in a small shared-memory file (``Counters``): trainer and
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

Handles follow the convention of vLLM's ``ipc_engine.py`` (``torch.multiprocessing.reductions.reduce_tensor`` on the
producer, ``rebuild_cuda_tensor`` with the receiver's own device index on the consumer), but travel as plain JSON in
the token-secured bridging store, never as pickles.
"""
from __future__ import annotations

import json
import mmap
import os
import secrets
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from ..errors import Deadline, SyncError
from ..pipeline import Batch, BufferPool, StageTimes, broadcast_bucket, round_names, wait_work, pack_bucket, \
    receive as receive_rounds, send as send_wire
from ..plan import Bucket, BucketPlan, dtype_name
from ..protocol import Keys
from .group import Member, wait_keys

_NUM_EVENTS = 2  # one per bucket buffer; num_buffers is 1 or 2


class CudaIpc:
    """The CUDA calls this transport makes, in one place (tests put a host-memory stand-in here to check the
    protocol on CPU, where CUDA IPC does not exist)."""

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def default_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def uuid(self, device: torch.device) -> str:
        if not self.available(device):
            return ""
        return str(torch.cuda.get_device_properties(_index(device)).uuid)

    def export(self, base: torch.Tensor) -> list:
        """``base``: a 1-D uint8 tensor over a whole storage. Returns JSON-able rebuild arguments."""
        from torch.multiprocessing.reductions import reduce_tensor

        _, a = reduce_tensor(base)
        # (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_size, storage_offset,
        #  requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
        return [list(a[1]), list(a[2]), a[3], a[7].hex(), a[8], a[9], a[11].hex(), a[12], bytes(a[13] or b"").hex(),
                bool(a[14])]

    def open(self, w: list, device: torch.device) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(torch.Tensor, torch.Size(w[0]), tuple(w[1]), w[2], torch.storage.TypedStorage,
                                   torch.uint8, _index(device), bytes.fromhex(w[3]), w[4], w[5], False,
                                   bytes.fromhex(w[6]), w[7], bytes.fromhex(w[8]), w[9])

    def alloc(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def new_event(self, device: torch.device):
        with torch.cuda.device(device):
            ev = torch.cuda.Event(interprocess=True)  # interprocess events cannot time (disable_timing is implied)
            ev.record(torch.cuda.current_stream(device))  # creates it on this device
            return ev, bytes(ev.ipc_handle()).hex()

    def open_event(self, handle: str, device: torch.device):
        return torch.cuda.Event.from_ipc_handle(device, bytes.fromhex(handle))

    def record(self, ev, device: torch.device) -> None:
        ev.record(torch.cuda.current_stream(device))

    def wait(self, ev, device: torch.device) -> None:
        torch.cuda.current_stream(device).wait_event(ev)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def collect(self) -> None:
        torch.cuda.ipc_collect()


backend = CudaIpc()

# What this process exported, by handle. CUDA IPC cannot open a handle in the process that made it, and a trainer
# with an in-process engine (TRL's colocate mode: vLLM's ``LLM`` in the training process) has its trainer rank and
# its receiver in one process: such a receiver takes the exporter's own tensor or event from here instead.
_OWN: dict[str, object] = {}


def _key(w) -> str:
    return json.dumps(w, separators=(",", ":"))


def export(base: torch.Tensor) -> list:
    w = backend.export(base)
    _OWN[_key(w)] = base
    return w


def unexport(w: list) -> None:
    _OWN.pop(_key(w), None)


def open_export(w: list, device: torch.device) -> torch.Tensor:
    own = _OWN.get(_key(w))
    return own if own is not None else backend.open(w, device)


def new_event(device: torch.device):
    ev, handle = backend.new_event(device)
    _OWN[handle] = ev
    return ev, handle


def open_event(handle: str, device: torch.device):
    own = _OWN.get(handle)
    return own if own is not None else backend.open_event(handle, device)


def forget_events(pairs) -> None:
    for _, handle in pairs or ():
        _OWN.pop(handle, None)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def require(device: torch.device, who: str) -> None:
    """Refuse ``mode="ipc"`` where CUDA IPC cannot work, with a message that says what to use instead."""
    if not backend.available(device):
        what = "CUDA is not available in this process" if not torch.cuda.is_available() else f"its device is {device}"
        raise SyncError(f"{who}: mode='ipc' needs the trainer rank and the receiver on one CUDA GPU (CUDA IPC), but "
                        f"{what}. Use mode='broadcast' (or 'auto', which picks ipc only when both report the same "
                        f"GPU UUID).", stage="rendezvous", who=who)


def device_uuid(device: torch.device) -> str:
    """The physical GPU behind ``device`` ("" for a CPU or where CUDA is unavailable)."""
    return backend.uuid(device)


class Counters:
    """A few int64 counters in a shared-memory file that both processes map: ``[announced, consumed by receiver 0,
    consumed by receiver 1, ...]``, each only ever written by its one owner and only ever increasing.

    The staged path's per-bucket signal. Both processes are on one host by definition of this transport, so a store
    to a mapped page is seen by the other process within microseconds (x86 keeps stores in order; the counters are
    aligned int64s), where a gloo all-reduce over loopback measured 0.37 ms per bucket on the H200 machine (74 buckets:
    27 of a 50 ms push). A waiter spins on the counter for a moment, then backs off to short sleeps.
    """

    def __init__(self, path: str, slots: int, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 8 * slots)
            self._mm = mmap.mmap(fd, 8 * slots)
        finally:
            os.close(fd)
        self.v = memoryview(self._mm).cast("q")
        self.path, self.owner = path, create

    @classmethod
    def create(cls, slots: int) -> "Counters":
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return cls(os.path.join(folder, f"trainer_sync-ipc-{os.getpid()}-{secrets.token_hex(8)}"), slots, True)

    def wait(self, idx: int, target: int, timeout_s: float, what: str, who: str, push: Deadline | None = None
             ) -> None:
        """Spin until counter ``idx`` reaches ``target``; ``push.check()`` every few ms (another member gave up)."""
        v = self.v
        if v[idx] >= target:
            return
        deadline = time.monotonic() + timeout_s
        asked = time.monotonic()
        spins = 0
        while v[idx] < target:
            spins += 1
            if spins % 1024 == 0:
                now = time.monotonic()
                if now > deadline:
                    raise SyncError(f"{what}: no signal within {timeout_s:g}s ({who})", stage="transfer", who=who)
                if push is not None and now - asked >= Deadline.POLL_S:
                    push.check()
                    asked = now
                if spins > 200_000:  # a long wait (a slow peer): stop burning a core
                    time.sleep(1e-4)

    def close(self) -> None:
        self.v.release()
        self._mm.close()
        if self.owner:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class IpcSender:
    """The trainer-rank side of one epoch, for the receivers on this rank's GPU (``local``); built by
    ``Sender.connect`` when the layout gives this rank any. The receivers on other GPUs, if any, are reached through
    ``group`` in ``send``: in the direct path by the ordinary wire loop, in the staged path by broadcasting the very
    buffer the local receivers map (one pack for both transports)."""

    def __init__(self, store: dist.Store, rank: int, local: tuple[int, ...], num_receivers: int,
                 device: torch.device, timeout_s: float, direct: bool = True):
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
            self._new[eid] = self._handles[eid] = export(base)
        return eid

    def _release(self, live: set[int]) -> None:
        self._stale = [e for e in self._held if e not in live]

    def after_push(self) -> None:
        """Called once every receiver acknowledged: they have unmapped what this push stopped using."""
        if self._stale:
            for eid in self._stale:
                base = self._held.pop(eid)
                unexport(self._handles.pop(eid))
                self._ids.pop((base.untyped_storage().data_ptr(), base.untyped_storage().nbytes()), None)
            self._stale = []
            backend.collect()

    # ---- one push -------------------------------------------------------------------------------------------
    def _direct_slots(self, plan: BucketPlan, source, mine: list[Bucket]):
        """[[export id, byte offset] per slot] per bucket of this rank, or None when a piece cannot go direct."""
        if not self.allow_direct:
            return None
        backing = {}
        for b in mine:
            for s in b.slots:
                if s.name not in backing:
                    t = _backing(source, s.name)
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
            self._ready = [new_event(self.device) for _ in range(_NUM_EVENTS)]
        return self._ready

    def send(self, plan: BucketPlan, source, p: str, num_buffers: int, group=None, pool: BufferPool | None = None,
             deadline: Deadline | None = None) -> StageTimes:
        """One push: the local receivers by CUDA IPC, and the other receivers (if ``group``) over the wire."""
        mine_by_round = plan.buckets_of(self.rank)
        mine = [b for b in mine_by_round if b is not None]
        ready = self._events()
        direct = self._direct_slots(plan, source, mine)
        manifest = {"events": [h for _, h in ready], "nb": num_buffers}
        if direct is not None:
            slots, live = direct
            backend.record(ready[0][0], self.device)  # everything the trainer wrote so far is in the receivers' view
            manifest.update(kind="direct", slots=slots)
        else:
            self._direct_key = None
            need = max(plan.max_bucket_bytes, 1)
            if len(self._bufs) != num_buffers or any(b.numel() < need for _, b in self._bufs):
                self._bufs = []  # the old ones go stale (released after this push)
                for _ in range(num_buffers):
                    buf = backend.alloc(need, self.device)
                    self._bufs.append((self._export(buf.untyped_storage()), buf))
            live = {eid for eid, _ in self._bufs}
            if self._counters is None:
                self._counters = Counters.create(1 + self.num_receivers)
            manifest.update(kind="staged", bufs=[eid for eid, _ in self._bufs], counters=self._counters.path,
                            start=self._announced)
        self._release(live)
        manifest.update(new={str(k): v for k, v in self._new.items()}, live=sorted(live))
        self.store.set(Keys.ipc(p, self.rank), json.dumps(manifest, separators=(",", ":")))
        self._new = {}
        if direct is None:
            return self._send_staged(plan, source, mine_by_round, num_buffers, group, deadline)
        if group is not None:  # the local receivers read in place; the others get the ordinary wire push
            return send_wire(plan, source, group, pool, num_buffers, deadline)
        return StageTimes()

    def _send_staged(self, plan, source, mine_by_round, nb: int, group, deadline) -> StageTimes:
        times = StageTimes()
        if self._free is None:
            keys = [f"ipc/free{self.rank}/{j}" for j in self.local]
            if wait_keys(self.store, keys, self.timeout_s):
                raise SyncError(f"{self.who}: receivers published no IPC events", stage="transfer", who=self.who)
            self._free = {j: [open_event(h, self.device) for h in json.loads(self.store.get(k))]
                          for j, k in zip(self.local, keys)}
        starts = {x.name: x.start for x in source.pieces()}
        ready, flags = self._ready, self._counters
        wire: dict[int, tuple[Bucket, object]] = {}  # buffer -> its broadcast to the other GPUs' receivers
        failure = None
        try:
            for rnd, names in enumerate(round_names(plan)):
                bucket = mine_by_round[rnd]
                with source.gathering(names):
                    if bucket is None:
                        continue
                    g = self._announced  # this bucket's number in the epoch
                    s = g % nb
                    t = time.perf_counter()
                    if s in wire:  # the wire must be done with the buffer too
                        b, work = wire.pop(s)
                        wait_work(work, deadline, f"bucket {b.index} (round {b.round})", self.who)
                    if g >= nb:  # buffer s last held bucket g - nb: every local receiver must have queued its copies
                        what = f"ipc buffer {s} for bucket {bucket.index}"
                        for j in self.local:
                            flags.wait(1 + j, g - nb + 1, self.timeout_s, what, f"receiver {j}", deadline)
                        for evs in self._free.values():
                            backend.wait(evs[s], self.device)  # ...and the GPU waits until those copies ran
                    times.transfer += time.perf_counter() - t
                    t = time.perf_counter()
                    buf = self._bufs[s][1]
                    pack_bucket(bucket, plan, source, starts, buf)
                    backend.record(ready[s][0], self.device)
                    flags.v[0] = g + 1  # announce: its "ready" event is recorded
                    self._announced = g + 1
                    times.pack += time.perf_counter() - t
                    if group is not None:
                        wire[s] = (bucket, broadcast_bucket(group, buf[:bucket.nbytes]))
            t = time.perf_counter()
            for b, work in wire.values():
                wait_work(work, deadline, f"bucket {b.index} (round {b.round})", self.who)
            times.transfer += time.perf_counter() - t
        except SyncError as e:
            failure = (type(e), str(e), e.stage, e.who)
        if failure is not None:  # as in pipeline.send: drop the failed Work before raising
            wire.clear()
            raise failure[0](*failure[1:])
        return times

    def close(self) -> None:
        if self._counters is not None:
            self._counters.close()
            self._counters = None
        self._direct_key = None
        for w in self._handles.values():
            unexport(w)
        forget_events(self._ready)
        self._bufs, self._held, self._ids, self._new, self._handles = [], {}, {}, {}, {}
        self._ready, self._free, self._stale = None, None, []
        if backend.available(self.device):
            backend.collect()


def _backing(source, name: str) -> torch.Tensor | None:
    """The live tensor whose storage ``source.flat(name)`` views (None where there is no such tensor)."""
    from ..sources.deepspeed import DeepSpeedSource
    from ..sources.fsdp import local_tensor

    if isinstance(source, DeepSpeedSource):  # its flat() is a transient gather
        return None
    p = getattr(source, "params", {}).get(name)
    return None if p is None else local_tensor(p)


class IpcReceiver:
    """The receiver side of one epoch, for the trainer ranks on this receiver's GPU (``srcs``).

    ``receive`` takes one push: it runs ``pipeline.receive`` with itself as the ``local`` hook (``take``/``consumed``
    per round), so the buckets of the other GPUs' trainer ranks, if any, arrive over their groups in the same loop."""

    def __init__(self, store: dist.Store, me: Member, srcs: tuple[int, ...], num_receivers: int,
                 device: torch.device, timeout_s: float):
        self.store, self.me, self.device, self.timeout_s = store, me, device, timeout_s
        self.srcs, self.num_receivers = tuple(srcs), num_receivers
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}  # (trainer rank, export id) -> uint8 view
        self._events: dict[str, object] = {}  # handle -> opened event
        self._free: dict[int, list] = {}  # trainer rank -> [(event, handle)] this receiver records
        self._counters: dict[str, Counters] = {}
        self._consumed: dict[int, int] = {}  # trainer rank -> its buckets consumed this epoch
        self._cache = None  # (buckets, slots) -> batches of the last all-direct push
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
        return {r: json.loads(self.store.get(k)) for r, k in zip(self.srcs, keys)}

    def _begin(self, p: str, num_buffers: int) -> None:
        """Read this push's manifests; unmap what the trainer ranks no longer send, map what is new."""
        self._man = man = self._manifests(p)
        self._nb, self._index, self._waited, self.reusable = num_buffers, {r: 0 for r in man}, set(), True
        for r, m in man.items():
            live = set(m["live"])
            for k in [k for k in self._mapped if k[0] == r and k[1] not in live]:
                del self._mapped[k]
            for eid, w in m["new"].items():
                self._mapped[(r, int(eid))] = open_export(w, self.device)
            for h in m["events"]:
                if h not in self._events:
                    self._events[h] = open_event(h, self.device)
            if m["kind"] == "staged":
                self.reusable = False
                if r not in self._free:
                    self._free[r] = [new_event(self.device) for _ in range(_NUM_EVENTS)]
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
                    backend.wait(self._events[m["events"][0]], self.device)
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
                backend.wait(self._events[m["events"][g % self._nb]], self.device)
                batch.extend(asm.add(b, self._mapped[(b.src, m["bufs"][g % self._nb])]))
                self._staged.append((b.src, g, m["counters"]))
                self._consumed[b.src] = g + 1
            self._index[b.src] = i + 1
        return batch

    def consumed(self) -> None:
        """The copies out of this round's staged buffers are queued: let their trainer ranks re-pack them."""
        for src, g, path in self._staged:
            backend.record(self._free[src][g % self._nb][0], self.device)
            self._counters[path].v[1 + self.me.rank] = g + 1  # its "consumed" event is recorded
        self._staged = []

    def receive(self, plan: BucketPlan, p: str, num_buffers: int, on_batch, wanted: set[str] | None, me: str,
                groups: dict, pool: BufferPool, deadline: Deadline) -> StageTimes:
        """One push: the buckets of the trainer ranks on this GPU by IPC, the others from ``groups`` (this
        receiver's groups: empty when every trainer rank is on its GPU)."""
        self._begin(p, num_buffers)
        key = (plan.buckets, tuple(json.dumps(m.get("slots")) for m in self._man.values()))
        if self._cache is not None and (groups or not self.reusable or self._cache[0] != key):
            self._cache = None
        if self._cache is not None:  # same plan, same storages: the views from last time are still right
            times = StageTimes()
            for m in self._man.values():
                backend.wait(self._events[m["events"][0]], self.device)
            t = time.perf_counter()
            for batch in self._cache[1]:
                on_batch(batch)
            times.apply += time.perf_counter() - t
        else:
            kept: list[Batch] = []

            def keep(batch: Batch) -> None:
                kept.append(batch)
                on_batch(batch)

            times = receive_rounds(plan, groups, pool, num_buffers, deadline, on_batch if groups else keep, wanted,
                                   me, local=self)
            if self.reusable and not groups:  # replayable only when nothing came over the wire
                self._cache = (key, kept)
        t = time.perf_counter()
        backend.synchronize(self.device)  # the engine holds the new weights (and reads no trainer memory) before
        times.transfer += time.perf_counter() - t  # anyone acknowledges
        return times

    def close(self) -> None:
        for c in self._counters.values():
            c.close()
        for pairs in self._free.values():
            forget_events(pairs)
        self._counters, self._cache, self._mapped, self._events, self._free = {}, None, {}, {}, {}
