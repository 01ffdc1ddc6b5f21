"""Point-to-point catch-up for engines that join a running job (dynamic clusters).

Why: a broadcast needs every member present when it starts, so an engine started mid-training cannot take part in
the push in flight, and making the trainer re-push for it would stall training. Instead each trainer rank can keep
its share of the latest version (its packed buckets, exactly as they went on the wire) in host memory; a joining
engine pulls those bytes from all trainer ranks in parallel, point to point, while training goes on. From the next
push on the engine is in the broadcast membership.

Who does what:
  * ``Snapshot`` (every trainer rank): a copy of this rank's packed buckets of the last complete push, taken while
    they are on the wire (pinned host memory on GPU). A push that fails leaves no valid snapshot: a joiner can never
    pull a version that did not land whole.
  * ``CatchUpServer`` (a daemon thread on every trainer rank): serves join requests. Trainer rank 0 is the
    coordinator: it checks the joiner's token (the rendezvous HMAC; the token never travels) and publishes the plan;
    every rank then sends its own buckets over a two-member gloo group formed for that join (transport/p2p.py).
  * ``pull_latest`` (the joiner): register, authenticate, check the plan against what it expects, receive from all
    trainer ranks at once, hand whole tensors to ``on_batch`` (pipeline.receive, the loop of every push).

Deltas: when the latest push went as deltas, the snapshot also keeps each bucket's delta frames (header + body,
as they went on the wire), which take an engine that holds the version before it (``delta_base``) to the latest.
A joiner that passes its destination (``pull_latest(dest=...)``: a codec/delta DeltaDestination, which a previous
pull or push filled) and holds exactly that version of the same plan asks for them; they arrive through the same
receive loop with the delta codec, and its verdict round settles with the serving ranks: a destination that is not
at the base after all refuses, and the full snapshot follows at once (the second pass of the same loop).

The coordinator is reached at the rendezvous address (SyncConfig.host:port); nothing else listens.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Callable

import torch

from ..codec.delta.codec import DeltaReceive
from ..codec.delta.destination import DeltaDestination
from ..codec.plain import PLAIN
from ..errors import Deadline, HandshakeMismatch, SyncError
from ..pipeline.loops import Batch, BufferPool, receive
from ..pipeline.verdict import VerdictRound
from ..plan.buckets import Bucket, BucketPlan, PlanCache
from ..plan.delta_policy import plan_digest
from ..plan.handshake import check_plan
from ..protocol import wire
from ..protocol.messages import CatchupOffer, Expected
from ..transport.group import Member, Rendezvous, wait_keys
from ..transport.p2p import JOINER, TRAINER, PairRecv, pair_group, send_buckets

POLL_S = 0.002  # a check on its own store connection costs ~50 us; joins start within 2 ms
VERDICT = "catchup/"  # the join namespace's prefix of the verdict round of a delta catch-up


class Snapshot:
    """This trainer rank's packed buckets of the latest complete push, for joiners.

    One copy (reused across pushes) guarded by a lock: a push rewrites it while holding the lock, so a pull in
    progress delays the next push's snapshot by at most the pull's own time, and a pull never sees a mix of versions.
    """

    def __init__(self, budget_bytes: int | None = None):
        self.lock = threading.Lock()
        self.budget = budget_bytes
        self.buckets: dict[int, torch.Tensor] = {}
        self.version: int | None = None
        self.plan_text: str | None = None
        # The latest push's delta frames per bucket (one buffer, its frame sizes), when it went as deltas against
        # ``delta_base``: what takes a joiner at that version to ``version``.
        self.deltas: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.delta_base: int | None = None
        self._base: int | None = None
        self._writing = False

    def begin(self) -> None:
        self.lock.acquire()
        self._writing = True
        self.version = None  # invalid until commit: a failed push leaves nothing to pull
        self._base = None

    def delta_from(self, base: int) -> None:
        """This push goes as deltas against version ``base``: keep its frames too."""
        self._base = base

    def keep(self, bucket: Bucket, data: torch.Tensor, frames: list[torch.Tensor] | None = None) -> None:
        held = self.buckets.get(bucket.index)
        if held is None or held.numel() != data.numel():
            self._fits(data.numel())
            held = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=data.is_cuda)
            self.buckets[bucket.index] = held
        held.copy_(data, non_blocking=data.is_cuda)
        if self._base is None or not frames or frames[0] is data:  # a full bucket: no delta of this push
            self.deltas.pop(bucket.index, None)
            return
        sizes = [f.numel() for f in frames]
        buf = self.deltas.get(bucket.index, (None, None))[0]
        if buf is None or buf.numel() < sum(sizes):
            self._fits(sum(sizes) - (buf.numel() if buf is not None else 0))
            buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=data.is_cuda)
        at = 0
        for f, n in zip(frames, sizes):
            buf[at:at + n].copy_(f.reshape(-1).view(torch.uint8), non_blocking=data.is_cuda)
            at += n
        self.deltas[bucket.index] = (buf, sizes)

    def _fits(self, more: int) -> None:
        if self.budget is not None and self.nbytes() + more > self.budget:
            raise SyncError(f"catch-up snapshot exceeds its memory budget ({self.budget} B); raise "
                            f"SyncConfig.keep_latest_mb or turn keep_latest off", stage="transfer")

    def delta_frames(self, bucket: Bucket) -> list[torch.Tensor]:
        buf, sizes = self.deltas[bucket.index]
        out, at = [], 0
        for n in sizes:
            out.append(buf[at:at + n])
            at += n
        return out

    def commit(self, plan_text: str, version: int, keep: set[int]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking D2H copies must have landed
        for index in [i for i in self.buckets if i not in keep]:
            del self.buckets[index]
        for index in [i for i in self.deltas if i not in keep]:
            del self.deltas[index]
        whole = self._base is not None and all(i in self.deltas for i in keep)
        self.delta_base = self._base if whole else None
        self.plan_text, self.version = plan_text, version
        self._release()

    def abandon(self) -> None:
        """Called after every push: a no-op once committed, else the half-rewritten snapshot is marked invalid."""
        if self._writing:
            self.version = self.delta_base = None
            self._release()

    def _release(self) -> None:
        if self._writing:
            self._writing = False
            self.lock.release()

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.buckets.values()) + sum(b.numel() for b, _ in self.deltas.values())


class CatchUpServer:
    """Serves joiners from one trainer rank's snapshot in a daemon thread (the training loop is not involved)."""

    def __init__(self, rdzv: Rendezvous, rank: int, world: int, snapshot: Snapshot, timeout_s: float):
        # A connection of its own: a store client serializes its calls, so sharing the trainer's would stall this
        # thread behind any blocking wait of the training loop (and vice versa).
        self.rdzv = Rendezvous(rdzv.host, rdzv.port, rdzv.token, is_server=False, timeout_s=timeout_s)
        self.rank, self.world, self.snapshot, self.timeout_s = rank, world, snapshot, timeout_s
        self.served: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"trainer_sync-catchup-{rank}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        store, k = self.rdzv.store, 0
        while not self._stop.is_set():
            key = f"ts/join/{k}/{'hello' if self.rank == 0 else 'decided'}"
            try:
                pending = store.check([key])
            except Exception as e:  # noqa: BLE001 - the store is trainer rank 0's: it is gone when rank 0 stopped
                if not self._stop.is_set():
                    warnings.warn(f"trainer_sync catch-up: trainer rank {self.rank} stops serving joiners: the "
                                  f"rendezvous store went away (trainer rank 0 stopped?): {e}")
                return
            if not pending:
                self._stop.wait(POLL_S)
                continue
            try:
                self._serve(k)
            except Exception as e:  # noqa: BLE001 - a failed join must not kill the server (or the trainer)
                warnings.warn(f"trainer_sync catch-up: join {k} failed on trainer rank {self.rank}: {e}")
            k += 1

    def _serve(self, k: int) -> None:
        store, epoch = self.rdzv.store, f"join{k}"
        if self.rank == 0:
            try:
                ns = self.rdzv.authenticate(Member("trainer", 0), epoch, [Member("joiner", k)])
                store.set(f"ts/join/{k}/decided", "admitted")
            except SyncError:
                store.set(f"ts/join/{k}/decided", "refused")
                raise
        elif store.get(f"ts/join/{k}/decided").decode() != "admitted":
            return
        else:
            ns = self.rdzv.namespace(epoch)
        t = time.perf_counter()
        with self.snapshot.lock:
            snap = self.snapshot
            ns.set(f"src{self.rank}", wire.encode(CatchupOffer(snap.version, snap.plan_text if self.rank == 0 else None,
                                                               snap.delta_base)))
            if snap.version is None:
                return
            plan = BucketPlan.from_json(snap.plan_text)
            mine = [b for b in plan.buckets if b.src == self.rank]
            if wait_keys(ns, ["want"], self.timeout_s):
                raise SyncError(f"trainer rank {self.rank}: the joiner did not say what it wants within "
                                f"{self.timeout_s:g}s", stage="handshake", who=f"joiner {k}")
            delta = ns.get("want").decode() == "delta" and snap.delta_base is not None
            pg = pair_group(ns, self.rank, TRAINER, self.timeout_s, self.rdzv.host)
            try:  # the snapshot is immutable while we hold its lock: every send can be posted at once
                if delta:
                    send_buckets(pg, [(b, f) for b in mine for f in snap.delta_frames(b)], self.timeout_s)
                    refusals = VerdictRound(ns, VERDICT, 1, self.timeout_s, VERDICT + "abort",
                                            f"trainer rank {self.rank}").settle()
                    delta = not refusals
                if not delta:
                    send_buckets(pg, [(b, snap.buckets[b.index]) for b in mine], self.timeout_s)
            finally:
                pg.abort()
        self.served.append({"join": k, "version": snap.version, "seconds": time.perf_counter() - t,
                            "delta": delta})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.rdzv.close()


def pull_latest(host: str, port: int, token: str, num_trainers: int, on_batch: Callable[[Batch], None],
                expected: Expected | None = None, device: torch.device | str = "cpu",
                timeout_s: float = 120.0, pool: BufferPool | None = None,
                dest: DeltaDestination | None = None) -> int:
    """Join a running job and apply its latest complete version; returns that version.

    ``dest``: this engine's delta destination (the module docstring): written by the pull, and when it holds the
    version the latest push was a delta against, only that delta is pulled.

    Raises RendezvousRefused (wrong token), HandshakeMismatch (the trainer's tensors do not match ``expected``;
    nothing is received), or SyncError (no version kept, or a trainer rank moved to a newer version mid-join: retry).
    """
    rdzv = Rendezvous(host, port, token, is_server=False, timeout_s=timeout_s)
    store = rdzv.store
    k = store.add("ts/join/count", 1) - 1
    me = Member("joiner", k)
    store.set(f"ts/join/{k}/hello", "1")
    ns = rdzv.authenticate(me, f"join{k}", [])
    keys = [f"src{r}" for r in range(num_trainers)]
    missing = wait_keys(ns, keys, timeout_s)
    if missing:
        raise SyncError(f"{me}: no answer from trainer ranks {missing} within {timeout_s:g}s", stage="rendezvous")
    answers = [wire.decode(ns.get(key), CatchupOffer, stage="handshake") for key in keys]
    versions = {a.version for a in answers}
    if None in versions:
        raise SyncError(f"{me}: the trainer keeps no complete version to pull (keep_latest off, or no push landed "
                        f"yet)", stage="handshake", who="trainer")
    if len(versions) != 1:
        raise SyncError(f"{me}: trainer ranks hold different versions {sorted(versions)} (a push landed during the "
                        f"join); pull again", stage="handshake", who="trainer")
    plan = PlanCache().parse(answers[0].plan)
    if expected is not None and expected.tensors:
        errors = check_plan(plan, expected, str(me))
        if errors:
            raise HandshakeMismatch(errors)
    device = torch.device(device)
    codec = PLAIN
    if dest is not None:
        held = dest.version if dest.digest == plan_digest(answers[0].plan) and dest.dest is not None else None
        dest.prepare(plan, answers[0].plan)
        delta = held is not None and all(a.delta_base == held for a in answers)
        codec = DeltaReceive(dest, plan, delta, str(me))
    ns.set("want", "delta" if codec.verdict else "full")
    pairs = PairRecv({r: pair_group(ns, r, JOINER, timeout_s, host) for r in range(num_trainers)})
    try:
        # Receive buffers: pass the same pool to later pulls to skip touching fresh pages every time.
        staging = pool if pool is not None else BufferPool(torch.device("cpu"))
        wanted = set(expected.tensors) if expected is not None and expected.tensors else None

        def to_device(batch: Batch) -> None:
            on_batch(batch if device.type == "cpu" else [(n, t.to(device, non_blocking=True)) for n, t in batch])

        receive(plan, pairs, staging, 2, Deadline(timeout_s), to_device, wanted, str(me), codec=codec,
                verdict=VerdictRound(ns, VERDICT, 1, timeout_s, VERDICT + "abort", str(me), 0))
    finally:
        pairs.close()  # aborts the pair groups
    version = versions.pop()
    if codec is not PLAIN:
        codec.finished(version)
    return version
