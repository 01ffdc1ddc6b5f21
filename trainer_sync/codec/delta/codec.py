"""The delta codec (issue 16): a bucket travels as the elements that changed since the base version.

On the wire each bucket of a delta push is two frames on the trainer rank's group: the fixed 48-byte header (which
says the body's size) and then the body, the smallest of FULL / BITMASK / INDICES against the trainer's cached base
(format.encode); an empty body (nothing changed) is not sent. A bucket without a cached base (past the cache's cap,
or dropped after a failed push) goes FULL: the header and the raw packed bytes.

``DeltaSend`` (trainer, one per push) encodes against ``DeltaSendState`` (cache.py) and advances the cache while
the frames are on the wire; with ``decision.on`` false it is a full push that only keeps the packed bytes as the
next push's base. ``DeltaReceive`` (receiver, one per push) writes every push into the receiver's
``DeltaDestination`` (destination.py): a delta bucket is checked against the destination's base checksum (taken
while its header is on the way) and applied in place (decode.apply_segments); a full push is copied in. A
destination not at the base refuses (``refusal``): it stops applying, the rest is still received (no sender
stalls), and after the verdict round everyone runs the same push again full (``resend``), where the receiver hands
out only the tensors the delta pass had not delivered, so an engine never loads one twice.

An engine worker that holds a slice of each tensor (TP > 1) has ``Shards`` as its destination (shards.py): the
engine's workers check a bucket's base together (``Shards.combine`` of their owned parts, in ``arriving``), and each
writes the changes that fall into its own pieces; such a destination hands out ``(name, None)``: already in place.
"""
from __future__ import annotations

import torch

from ...errors import SyncError
from ...plan.buckets import Bucket, BucketPlan, dtype_of
from ...plan.delta_policy import DeltaDecision
from ...protocol.delta import PushStats
from ..base import Batch, Codec
from .cache import DeltaSendState
from .checksums import DeltaBaseMismatch, Sums, segments_sums, sums
from .decode import apply_segments
from .destination import DeltaDestination
from .format import FULL, HEADER_BYTES, KIND_NAMES, Header, encode
from .shards import Shards, piece_segments, write_whole


def plan_bytes(plan: BucketPlan, rank: int) -> int:
    return sum(b.nbytes for b in plan.buckets if b.src == rank)


class DeltaSend(Codec):
    """One push of one trainer rank with delta state: as deltas against ``decision.base`` when ``decision.on``,
    else full bytes kept as the next push's base. ``stats``: bytes sent (headers included), full bytes, changed and
    compared elements, the encodings chosen, and why the push went full (``full_reason``): protocol/delta.py's
    ``PushStats``, which every trainer rank publishes after the push (rank/delta_push.report_fields)."""

    def __init__(self, state: DeltaSendState, decision: DeltaDecision, plan: BucketPlan, rank: int):
        self.state, self.decision, self.plan, self.rank = state, decision, plan, rank
        self.delta = self.verdict = decision.on
        self._last: tuple = (None, None)  # the bucket on the wire: (encoded buffer or None, its stats / target sums)
        if decision.on:
            self.stats = PushStats()
        else:
            n = plan_bytes(plan, rank)
            self.stats = PushStats(n, n, full_reason=decision.reason)

    def encode(self, bucket: Bucket, data: torch.Tensor) -> list[torch.Tensor]:
        if not self.delta:
            return [data]
        st, stats = self.state, self.stats
        for lo, hi in st.pads(bucket):
            data[lo:hi].zero_()
        word = st.word(bucket)
        cached = st.cache.base(bucket.index, bucket.nbytes, self.decision.base)
        if cached is not None:
            # before the encoder may overwrite it in place (CPU: the changed words are written during the same pass
            # that finds them)
            st.cache.overwriting(bucket.index)
            enc, es = encode(cached[0], data, word=word, base=cached[1], update_prev=True)
            header, body, kind = enc[:HEADER_BYTES], enc[HEADER_BYTES:], KIND_NAMES[es.kind]
            self._last = (enc, es)
            stats.changed += es.changed
            stats.elements += es.n
        else:  # no base for this bucket (past the cache's cap, or dropped after a failed push)
            target, kind, n = sums(data), "uncached", bucket.nbytes // word
            h = Header(FULL, word, 0, n, n, 0, target.mixed, HEADER_BYTES + bucket.nbytes)
            header = torch.frombuffer(bytearray(h.pack()), dtype=torch.uint8).to(data.device)
            body = data
            self._last = (None, target)
        stats.sent += HEADER_BYTES + body.numel()
        stats.full += bucket.nbytes
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
        return [header, body] if body.numel() else [header]  # an empty body: the header says its size

    def sent(self, bucket: Bucket, data: torch.Tensor) -> None:
        """While the bucket is on the wire: the cache becomes this push's bytes (not yet acknowledged)."""
        if not self.delta:
            self.state.keep(bucket, data)
            return
        enc, es = self._last
        self._last = (None, None)
        if enc is not None:
            self.state.advance(bucket, enc, es)
        else:
            self.state.keep(bucket, data, es)

    def resend(self, refusals: list[str]) -> None:
        self.delta = self.verdict = False
        self.stats.sent += plan_bytes(self.plan, self.rank)
        self.stats.full_reason = "delta refused, resent full: " + "; ".join(refusals)

    def decode(self, bucket, buf, asm) -> Batch:
        raise TypeError("DeltaSend is the trainer side of the delta codec")


def _segments(dest: dict[str, torch.Tensor], b: Bucket) -> list[tuple[int, torch.Tensor]]:
    """The destination slices of bucket ``b``'s slots, each with its byte offset in the bucket."""
    return [(s.offset, dest[s.name][s.start:s.start + s.numel]) for s in b.slots]


class DeltaReceive(Codec):
    """One push on a receiver that keeps a destination: delta buckets applied into it (``delta``), or a full push
    copied into it; ``on_batch`` gets the destination's tensors (targets, or the mirror after a delta) or, for a full
    push into a mirror, the received views."""

    def __init__(self, dest: DeltaDestination, plan: BucketPlan, delta: bool, me: str):
        self.dest, self.plan, self.me = dest, plan, me
        self.delta = self.verdict = delta
        self.refused: str | None = None
        self.delivered: set[str] = set()  # tensors handed out by the delta pass
        self.skip: frozenset | set = frozenset()  # tensors the full pass must not hand out again
        self._headers: dict[int, Header] = {}
        self._bases: dict[int, Sums] = {}
        self._left: dict[str, int] = {}
        for b in plan.buckets:
            for s in b.slots:
                self._left[s.name] = self._left.get(s.name, 0) + 1

    def buffer_bytes(self, plan: BucketPlan) -> int:
        return plan.max_bucket_bytes + HEADER_BYTES

    def first(self, bucket, buf):
        return buf[:HEADER_BYTES] if self.delta else buf[:bucket.nbytes]

    def rest(self, bucket, buf):
        if not self.delta:
            return None
        h = Header.unpack(buf[:HEADER_BYTES])
        if not HEADER_BYTES <= h.nbytes <= HEADER_BYTES + bucket.nbytes:
            raise SyncError(f"{self.me}: delta header of bucket {bucket.index} says {h.nbytes} bytes for a bucket of "
                            f"{bucket.nbytes} (corrupt)", stage="transfer", who=self.me)
        self._headers[bucket.index] = h
        return buf[HEADER_BYTES:h.nbytes] if h.nbytes > HEADER_BYTES else None

    def arriving(self, buckets) -> None:
        """The destination's checksum sums of each bucket, taken while the trainer still encodes it, so the base
        check costs the receiver no time on the push's critical path."""
        dest = self.dest.dest
        if self.delta and self.refused is None and isinstance(dest, Shards):
            parts = [segments_sums(piece_segments(dest.owned, self.plan, b)) for b in buckets]
            for b, total in zip(buckets, dest.combine(parts)):  # every worker of the engine, the same buckets
                self._bases[b.index] = total
        elif self.delta and self.refused is None and dest is not None:
            for b in buckets:
                self._bases[b.index] = segments_sums(_segments(dest, b))

    def decode(self, bucket, buf, asm) -> Batch:
        if not self.delta:
            return self._full(bucket, buf, asm)
        h = self._headers.pop(bucket.index)
        base = self._bases.pop(bucket.index, None)
        dest = self.dest.dest
        if self.refused is None:
            try:
                self.apply_bucket(dest, bucket, h, buf[:h.nbytes], base)
            except DeltaBaseMismatch as e:
                self.refused = f"bucket {bucket.index}: {e}"
        ready = []
        for s in bucket.slots:
            self._left[s.name] -= 1
            if not self._left[s.name]:
                ready.append(s.name)
        if self.refused is not None:
            return []
        self.delivered.update(ready)
        if isinstance(dest, Shards):
            return [(n, None) for name in ready for n in asm.names_for(name)]
        return [(n, dest[name].view(self.plan.tensors[name].shape)) for name in ready for n in asm.names_for(name)]

    def apply_bucket(self, dest: dict[str, torch.Tensor] | None, b: Bucket, h: Header, buf: torch.Tensor,
                     base: Sums | None = None) -> None:
        """Check and write one delta bucket into ``dest`` (plan tensor name -> flat tensor, in place)."""
        if dest is None:
            raise DeltaBaseMismatch("delta: this receiver keeps no copy of the base version")
        if isinstance(dest, Shards):
            segments = piece_segments(dest.held, self.plan, b)
            if h.kind == FULL:
                body = buf[HEADER_BYTES:]
                for off, t in segments:
                    t.view(torch.uint8).copy_(body[off:off + t.numel() * t.element_size()])
                return
            # the base was checked by the engine's workers together (arriving); the result is not re-checked
            apply_segments([(off // h.word, t) for off, t in segments], buf, verify=False, base=base)
            return
        if h.kind == FULL:
            body = buf[HEADER_BYTES:]
            for s in b.slots:
                size = dtype_of(self.plan.tensors[s.name].dtype).itemsize
                dest[s.name][s.start:s.start + s.numel].view(torch.uint8).copy_(
                    body[s.offset:s.offset + s.numel * size])
            return
        apply_segments([(off // h.word, t) for off, t in _segments(dest, b)], buf, verify=True, base=base)

    def _full(self, bucket, buf, asm) -> Batch:
        """A full bucket: copy each tensor into the destination, then hand it on (the targets in targets mode,
        else the received views), leaving out tensors already delivered by a refused delta pass."""
        d = self.dest
        out = []
        for name, t in asm.add(bucket, buf):
            c = d.canon.get(name, name)
            if isinstance(d.dest, Shards):
                if c not in d.written:
                    write_whole(d.dest.held.get(c, ()), t)
                    d.written.add(c)
                if c not in self.skip:
                    out.append((name, None if c in d.dest.held else t))
                continue
            if d.dest is not None and c in d.dest and c not in d.written:
                d.dest[c].copy_(t.reshape(-1))
                d.written.add(c)
            if c in self.skip:
                continue
            out.append((name, d.dest[c].view(t.shape) if d.targets is not None else t))
        return out

    def refusal(self) -> str | None:
        return self.refused

    def resend(self, refusals: list[str]) -> None:
        self.delta = self.verdict = False
        self.skip = set(self.delivered)

    def finished(self, version: int) -> None:
        """After the push: the destination holds ``version`` whole when the delta applied everywhere, or every
        tensor was written by the full pass."""
        self.dest.finished(version, complete=self.verdict)
