"""Delta pushes, the receiving side (issue 16): where deltas are applied and the delta receive loop.

A receiver takes deltas into a *destination* that holds exactly the last version it received:

* ``targets`` (``Receiver(..., targets={name: tensor})``): the served tensors themselves. Every push (full or delta)
  is written into them in place and ``on_batch`` sees the targets; a delta writes only the changed elements.
* otherwise a *mirror*: one wire-dtype copy of the model kept by the receiver (capped by the trainer's
  ``SyncConfig.delta_mirror_mb``), for engines that take whole tensors and re-process them (vLLM's layerwise
  reload): the delta is applied to the mirror and ``on_batch`` gets whole tensors from it, as after a full push.

``receive_delta``: per round, the 48-byte header of every bucket, then the bodies; each bucket is applied with
delta.apply_segments, which checks the base checksum (and the result's) before writing. A destination not at the
base (``DeltaBaseMismatch``) stops the applying (the rest is still received, so no sender stalls); ``settle`` then
tells every member who refused, and the trainer resends the push full at once (``full_hook(skip=...)`` hands out
only the tensors the delta pass had not delivered yet, so an engine never loads one twice).
"""
from __future__ import annotations

import json
import time

import torch

from ..codec import delta as D
from ..plan.delta_policy import DeltaDecision, plan_digest, receiver_state
from ..errors import Deadline, SyncError
from .loops import Assembler, BufferPool, StageTimes, broadcast_bucket, wait_work
from ..plan.buckets import Bucket, BucketPlan, dtype_of
from ..protocol.messages import Keys
from ..transport.group import wait_keys


class DeltaReceiver:
    def __init__(self, mode: str, mirror_cap_bytes: int | None, targets: dict | None, device: torch.device,
                 adopts_targets: bool = False):
        _check_targets(targets)
        self.mode, self.cap, self.targets, self.device = mode, mirror_cap_bytes, targets, device
        # ``adopts_targets``: no mirror; the engine hands over its served tensors later (``adopt_targets``, e.g. once
        # vLLM's fast path is proven) and may take them back (``drop_targets``). Until then pushes go full.
        self.adopts = adopts_targets and targets is None
        self.may_adopt = self.adopts  # targets may still come: worth the trainer caching its pushes meanwhile
        self.pool = BufferPool(device)
        self.dest: dict[str, torch.Tensor] | None = None  # plan tensor name -> flat destination
        self.canon: dict[str, str] = {}
        self.plan: BucketPlan | None = None  # the plan of the last push (adopted targets are bound to it)
        self.digest: str | None = None
        self.version: int | None = None  # the version ``dest`` holds whole (None: none)
        self.why = "it has no delta targets yet (the engine adopts them once it can)" if self.adopts else ""
        self.written: set[str] = set()
        self.tensors: set[str] = set()

    def state(self) -> dict:
        """What this receiver holds, and whether it can take deltas at all (before its first push: it will have a
        destination; ``why`` says otherwise). A receiver that adopts targets says ``late``: its state can change
        after its acknowledgement (when the engine adopts or drops targets), so trainer rank 0 reads it again from
        the receiver's join key before deciding the next push."""
        if self.mode == "off":
            return receiver_state(self.digest, self.version, False, "delta off")
        if self.adopts and self.targets is None:
            st = receiver_state(self.digest, None, self.may_adopt, self.why)
        else:
            st = receiver_state(self.digest, self.version, not self.why, self.why)
        if self.adopts:
            st["late"] = True
        return st

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
                except D.DeltaError as e:
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
                raise D.DeltaError("trainer_sync: Receiver targets are adopted after a push (they are bound to the "
                                   "trainer's plan), none was received yet")
            self.targets = targets
            self.dest, self.version, self.why, self.may_adopt = self._bind_targets(self.plan), version, "", True
        except (D.DeltaError, TypeError, ValueError) as e:
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

    def _bind_targets(self, plan: BucketPlan) -> dict[str, torch.Tensor]:
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
            raise D.DeltaError("trainer_sync: Receiver targets do not match the trainer's tensors: " +
                               "; ".join(errors))
        return dest

    def full_hook(self, on_batch, skip: set[str] = frozenset()):
        """``on_batch`` for a full receive: copy each tensor into the destination, then hand it on (the targets in
        targets mode, else the received views), leaving out tensors in ``skip`` (already delivered)."""
        def hook(batch):
            out = []
            for name, t in batch:
                c = self.canon.get(name, name)
                if self.dest is not None and c in self.dest and c not in self.written:
                    self.dest[c].copy_(t.reshape(-1))
                    self.written.add(c)
                if c in skip:
                    continue
                out.append((name, self.dest[c].view(t.shape) if self.targets is not None else t))
            if out:
                on_batch(out)
        return hook

    def finished(self, version: int, complete: bool = False) -> None:
        """After a push of ``version``: the destination holds it whole when every tensor was written."""
        whole = self.dest is not None and (complete or self.written >= self.tensors)
        self.version = version if whole else None
        if self.dest is not None and not whole and not self.why:
            self.why = "it receives only part of the plan's tensors"


def _check_targets(targets: dict | None) -> None:
    if targets is None:
        return
    if not isinstance(targets, dict) or not all(isinstance(t, torch.Tensor) for t in targets.values()):
        raise TypeError("trainer_sync: Receiver targets must be a dict of tensor name -> torch.Tensor")
    bad = [n for n, t in targets.items() if not t.is_contiguous()]
    if bad:
        raise ValueError(f"trainer_sync: Receiver targets must be contiguous (written in place): {bad}")


def _segments(dest: dict[str, torch.Tensor], b: Bucket) -> list[tuple[int, torch.Tensor]]:
    """The destination slices of bucket ``b``'s slots, each with its byte offset in the bucket."""
    return [(s.offset, dest[s.name][s.start:s.start + s.numel]) for s in b.slots]


def _base_sums(dest: dict[str, torch.Tensor] | None, plan: BucketPlan, buckets: list[Bucket]) -> list:
    """The destination's checksum sums of each bucket (None without a destination): taken while the trainer still
    encodes the bucket, so the base check costs the receiver no time on the push's critical path."""
    if dest is None:
        return [None] * len(buckets)
    return [D.segments_sums(_segments(dest, b)) for b in buckets]


def _apply_bucket(dest: dict[str, torch.Tensor] | None, plan: BucketPlan, b: Bucket, h: D.Header,
                  buf: torch.Tensor, base: D.Sums | None = None) -> None:
    if dest is None:
        raise D.DeltaBaseMismatch("delta: this receiver keeps no copy of the base version")
    if h.kind == D.FULL:
        body = buf[D.HEADER_BYTES:]
        for s in b.slots:
            size = dtype_of(plan.tensors[s.name].dtype).itemsize
            dest[s.name][s.start:s.start + s.numel].view(torch.uint8).copy_(
                body[s.offset:s.offset + s.numel * size])
        return
    segments = [(off // h.word, t) for off, t in _segments(dest, b)]
    D.apply_segments(segments, buf, verify=True, base=base)


def receive_delta(plan: BucketPlan, groups: dict, dr: DeltaReceiver, deadline: Deadline, on_batch,
                  wanted: set[str] | None, me: str) -> tuple[StageTimes, str | None, set[str]]:
    """Receive one delta push into ``dr``'s destination. Returns the stage times, why a delta was refused (None:
    every bucket applied) and the tensors handed to ``on_batch``."""
    times = StageTimes()
    names = Assembler(plan, dr.device, wanted)
    left: dict[str, int] = {}
    for b in plan.buckets:
        for s in b.slots:
            left[s.name] = left.get(s.name, 0) + 1
    rounds = plan.rounds()
    per_round = max((len(r) for r in rounds), default=0)
    bodies = dr.pool.get(max(per_round, 1), plan.max_bucket_bytes + D.HEADER_BYTES)
    heads = [torch.empty(D.HEADER_BYTES, dtype=torch.uint8, device=dr.device) for _ in range(per_round)]
    refused, delivered = None, set()
    for buckets in rounds:
        t = time.perf_counter()
        posted = [(b, heads[i], broadcast_bucket(groups[b.src], heads[i])) for i, b in enumerate(buckets)]
        bases = _base_sums(dr.dest if refused is None else None, plan, buckets)  # while the headers are on the way
        for b, _, w in posted:
            wait_work(w, deadline, f"delta header of bucket {b.index} (round {b.round})",
                      f"trainer rank {b.src} -> {me}")
        bodies_posted = []
        for i, (b, head, _) in enumerate(posted):
            h = D.Header.unpack(head)
            if not D.HEADER_BYTES <= h.nbytes <= D.HEADER_BYTES + b.nbytes:
                raise SyncError(f"{me}: delta header of bucket {b.index} says {h.nbytes} bytes for a bucket of "
                                f"{b.nbytes} (corrupt)", stage="transfer", who=me)
            buf = bodies[i][:h.nbytes]
            buf[:D.HEADER_BYTES].copy_(head)
            w = broadcast_bucket(groups[b.src], buf[D.HEADER_BYTES:]) if h.nbytes > D.HEADER_BYTES else None
            bodies_posted.append((b, h, buf, w))
        for b, _, _, w in bodies_posted:
            if w is not None:
                wait_work(w, deadline, f"delta bucket {b.index} (round {b.round})", f"trainer rank {b.src} -> {me}")
        times.transfer += time.perf_counter() - t
        t = time.perf_counter()
        ready = []
        for (b, h, buf, _), base in zip(bodies_posted, bases):
            if refused is None:
                try:
                    _apply_bucket(dr.dest, plan, b, h, buf, base)
                except D.DeltaBaseMismatch as e:
                    refused = f"bucket {b.index}: {e}"
            for s in b.slots:
                left[s.name] -= 1
                if not left[s.name]:
                    ready.append(s.name)
        batch = []
        if refused is None:
            for name in ready:
                shape = plan.tensors[name].shape
                batch += [(n, dr.dest[name].view(shape)) for n in names.names_for(name)]
            delivered.update(ready)
        times.apply += time.perf_counter() - t
        if batch:
            t = time.perf_counter()
            on_batch(batch)
            times.apply += time.perf_counter() - t
    return times, refused, delivered


def settle(store, p: str, num_receivers: int, timeout_s: float, abort_key: str, who: str) -> list[str]:
    """Wait for every receiver's verdict on a delta push; the refusals ("receiver j: why"), the same list on every
    trainer rank and receiver, so that all of them resend / receive the push full together when it is not empty."""
    keys = [Keys.delta_ack(p, j) for j in range(num_receivers)]
    missing = wait_keys(store, keys, timeout_s, abort_key=abort_key, stage="apply", max_pause_s=1e-3)
    if missing:
        names = ", ".join(f"receiver {k.rsplit('/', 1)[1]}" for k in missing)
        raise SyncError(f"{who}: no verdict on the delta push from {names} within {timeout_s:g}s", stage="apply",
                        who=names)
    out = []
    for j, k in enumerate(keys):
        why = json.loads(store.get(k)).get("refused")
        if why:
            out.append(f"receiver {j}: {why}")
    return out


def take(dr: DeltaReceiver, plan: BucketPlan, msg: dict, full, on_batch, store, p: str, rank: int,
         num_receivers: int, timeout_s: float, deadline: Deadline, wanted: set[str] | None, me: str,
         abort_key: str, groups: dict) -> StageTimes:
    """One push on a receiver that keeps a destination: as deltas when the trainer said so (then the verdict round
    and, if anyone refused, the full resend), else ``full(callback)`` (the ordinary receive) into the destination."""
    dr.prepare(plan, msg["plan"])
    if not DeltaDecision.from_json(msg.get("delta")).on:
        times = full(dr.full_hook(on_batch))
        dr.finished(msg["version"])
        return times
    times, refused, delivered = receive_delta(plan, groups, dr, deadline, on_batch, wanted, me)
    store.set(Keys.delta_ack(p, rank), json.dumps({"refused": refused}))
    if not settle(store, p, num_receivers, timeout_s, abort_key, me):
        dr.finished(msg["version"], complete=True)
        return times
    again = full(dr.full_hook(on_batch, skip=delivered))  # someone refused: the trainer resends the push full
    dr.finished(msg["version"])
    return StageTimes(times.pack + again.pack, times.transfer + again.transfer, times.apply + again.apply)
