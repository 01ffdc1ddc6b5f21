"""Receiver: the receiving side of the core data path (one per receiver rank, e.g. one per vLLM worker).

``connect()`` joins the bridging group; each ``receive(on_batch)`` takes one push and hands whole tensors to
``on_batch`` as lists of ``(name, tensor)``, then acknowledges to the trainer. Tensors handed out may be views of
the receive buffers: copy what must outlive the callback.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from ..codec import Fp8Arrival, Fp8Rules
from ..codec.delta.codec import DeltaReceive
from ..codec.delta.destination import DeltaDestination, absent_state
from ..codec.plain import PLAIN
from ..errors import Aborted, Deadline, HandshakeMismatch, SyncError
from ..pipeline.loops import Batch, BufferPool, gc_paused, receive
from ..pipeline.verdict import VerdictRound
from ..plan.buckets import BucketPlan, PlanCache
from ..plan.delta_policy import DeltaDecision
from ..protocol import wire
from ..protocol.delta import DeltaState
from ..protocol.lora import LoraOffer, LoraSupport, lora_key
from ..protocol.messages import Ack, ErrorInfo, Expected, JoinInfo, Keys, PlanOffer, PlanRefusal
from ..transport import RecvTransport, cuda, open_recv
from ..transport.group import BridgeGroup, Member, Rendezvous, abort_reason, wait_keys
from ..transport.layout import agree_layout


@dataclass
class ReceiveResult:
    version: int
    bytes: int
    transfer_s: float
    apply_s: float


class Receiver:
    def __init__(self, info: JoinInfo | dict, expected: Expected | dict | None = None,
                 device: torch.device | str | None = None, dequantize_fp8: torch.dtype | None = None,
                 targets: dict[str, torch.Tensor] | None = None, delta_mirror: bool = True,
                 adopts_targets: bool = False, lora: LoraSupport | None = None):
        self.info = JoinInfo.read(info)
        # What this receiver's engine can do with a LoRA adapter (protocol/lora.py), told the trainer when it joins;
        # ``lora_offer``: what the push being received is for a LoRA trainer (None: plain weights).
        self.lora = lora
        self.lora_offer: LoraOffer | None = None
        if isinstance(expected, dict):
            expected = Expected({n: (tuple(s), d) for n, (s, d) in expected.items()})
        # dequantize_fp8: a bf16/fp32 engine opted in to fp8 on the wire; weights are dequantized on arrival into
        # the dtype ``expected`` names (else this one). Without it, fp8 weights and scales pass through as sent.
        # The trainer's Fp8Rules come with the join info: both sides pick the same tensors.
        self.fp8 = Fp8Arrival(expected, dequantize_fp8, Fp8Rules.from_dict(self.info.fp8_rules)) \
            if dequantize_fp8 is not None else None
        self.expected = self.fp8.wire_expected if self.fp8 and self.fp8.wire_expected else expected
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda", torch.cuda.current_device()) if self.info.backend == "nccl" else torch.device("cpu")
        if self.info.backend == "nccl" and self.device.type != "cuda":
            raise SyncError(f"receiver {self.info.receiver_rank}: the trainer uses NCCL but this receiver's device "
                            f"is {self.device}", stage="rendezvous")
        self._device_given = device is not None
        self.transport: RecvTransport | None = None  # of the current epoch (transport/__init__.py: open_recv)
        self.me = Member("receiver", self.info.receiver_rank)
        self.pool = BufferPool(self.device)
        self.bridge: BridgeGroup | None = None
        self.rdzv: Rendezvous | None = None
        self.seq = 0
        self._open = False  # a receive started and has not acknowledged
        self.note: dict = {}  # extra Ack fields (the vLLM backend says how it applied the push: engine_apply)
        self.version = 0
        self._plans = PlanCache()
        # Delta pushes (codec/delta/destination.py): ``targets`` are the served tensors, written in place by every
        # push (a delta writes only what changed); without them a mirror of the last version is kept
        # (SyncConfig.delta_mirror_mb) so that deltas can be turned into whole tensors for ``on_batch``.
        self.delta: DeltaDestination | None = None
        # ``delta_mirror=False``: no mirror (this receiver takes full pushes unless it has targets).
        # ``adopts_targets=True``: no mirror either, but the engine may hand over its served tensors later
        # (``adopt_targets``; the vLLM backend does once its fast path is proven) and take deltas from then on.
        if targets is not None or (self.info.delta != "off" and (delta_mirror or adopts_targets)):
            cap = None if self.info.delta_mirror_mb is None else int(self.info.delta_mirror_mb * 2**20)
            self.delta = DeltaDestination(self.info.delta, cap, targets, self.device, adopts_targets=adopts_targets)
        self.whole_version: int | None = None  # the version of the last push this receiver completed (None: failed)

    def adopt(self, old: "Receiver") -> None:
        """Carry ``old``'s delta destination (what it holds, at which version) over to this receiver of a new
        bridging group, before ``connect``: it says so when it joins, and the trainer can go on with deltas."""
        if old.delta is not None and self.delta is not None and self.delta.targets is None:
            self.delta = old.delta
            self.whole_version = old.whole_version

    def connect(self) -> None:
        i = self.info
        self.rdzv = Rendezvous(i.host, i.port, i.token, is_server=False, timeout_s=i.timeout_s)
        # Report this receiver's GPU (its own device, else the current CUDA device); trainer rank 0 decides which
        # trainer ranks it reaches by CUDA IPC (those on its GPU) and which through the groups (transport/layout.py).
        dev = self.device if self._device_given or self.device.type == "cuda" else cuda.backend.default_device()
        self.bridge = BridgeGroup(self.rdzv, self.me, i.epoch, i.num_trainers, i.num_receivers, i.backend,
                                  i.timeout_s, decide=lambda store: agree_layout(
                                      store, self.me, "", cuda.device_uuid(dev), i.num_trainers, i.num_receivers,
                                      i.backend, i.timeout_s))
        if self.bridge.layout.local_srcs(i.receiver_rank):  # some trainer ranks share its GPU: CUDA IPC from them
            cuda.require(dev, str(self.me))
            self.device = dev
            self.pool = BufferPool(dev)
        self.transport = open_recv(self.bridge, self.me, self.device, i.timeout_s)
        if self.delta is not None:
            self.delta.ipc = bool(self.transport.local_srcs)
            self.delta.publish = lambda state, store=self.bridge.store: wire.put(
                store, Keys.delta_state(i.receiver_rank), state)
        store = self.bridge.store
        wire.put(store, Keys.delta_state(i.receiver_rank), self._delta_state())
        if self.lora is not None:  # before the expectations: whoever read those can read this
            wire.put(store, lora_key(i.receiver_rank), self.lora)
        # An empty Expected when this receiver checks nothing (the trainer reads it the same as none).
        wire.put(store, Keys.expected(i.receiver_rank), self.expected if self.expected is not None else Expected())

    def _delta_state(self) -> DeltaState:
        """What this receiver tells the trainer about deltas (protocol/delta.py)."""
        return self.delta.told() if self.delta is not None else absent_state(self.info.delta,
                                                                            bool(self.transport.local_srcs))

    # The engine's side of delta targets (the vLLM backend): thin calls into the destination (destination.py).
    def adopts(self) -> bool:
        """Whether targets can be adopted at run time (``adopts_targets=True``, and no CUDA IPC hop: those go full)."""
        return self.delta is not None and self.delta.takes_adopted()

    def adopt_targets(self, targets: dict[str, torch.Tensor]) -> bool:
        """From the next push on, write pushes (deltas too) straight into ``targets``: the served tensors, which
        must hold exactly what the last push delivered (names as the trainer sends them, its wire dtype, contiguous).
        Returns whether the receiver now holds targets; when they do not fit the trainer's plan it says why in its
        state and keeps taking full pushes. Trainer rank 0 reads the new state before its next push."""
        return self.delta is not None and self.delta.offer(targets, self.whole_version)

    def drop_targets(self, why: str, for_good: bool = False) -> None:
        """Stop writing into adopted targets (before the engine changes them some other way): pushes go full, with
        ``why`` in the trainer's ``SyncReport.full_reason``. ``for_good``: none will be adopted again (the trainer
        then stops keeping a copy of its pushes for this receiver)."""
        if self.adopts():
            self.whole_version = None  # the engine may change them now: only a later push makes them a version again
            self.delta.withdraw(why, for_good)

    def receive(self, on_batch: Callable[[Batch], None], on_plan: Callable[[BucketPlan], None] | None = None
                ) -> ReceiveResult:
        """Take one push. Raises HandshakeMismatch when the trainer's plan was refused (nothing was received).

        ``on_plan(plan)`` sees the accepted plan before the first batch (the vLLM backend learns the places of the
        tensors it announces). ``self.note`` (a small dict the caller may set) travels with the acknowledgement."""
        with gc_paused():
            return self._receive(on_batch, on_plan)

    def _receive(self, on_batch: Callable[[Batch], None], on_plan=None) -> ReceiveResult:
        if self.bridge is None:
            raise SyncError(f"{self.me}: receive() before connect()", stage="handshake")
        p = Keys.push(self.seq)
        self.seq += 1
        self._open = True
        self.whole_version = None
        store, abort_key = self.bridge.store, Keys.abort(p)
        if wait_keys(store, [Keys.plan(p)], self.info.timeout_s, abort_key=abort_key, stage="handshake",
                     max_pause_s=1e-3):
            raise SyncError(f"{self.me}: no push from the trainer within {self.info.timeout_s:g}s",
                            stage="handshake", who="trainer rank 0")
        msg = wire.decode(store.get(Keys.plan(p)), PlanOffer, PlanRefusal, stage="handshake")
        if isinstance(msg, PlanRefusal):
            raise HandshakeMismatch(msg.lines, msg.receivers)
        plan = self._plans.parse(msg.plan)
        self.lora_offer = msg.lora
        wanted = set(self.expected.tensors) if self.expected and self.expected.tensors else None
        if msg.lora is not None and msg.lora.mode == "adapter":  # its A/B are no checkpoint tensors
            wanted = None
        try:
            if on_plan is not None:
                on_plan(plan)
            cb = self.fp8.wrap(on_batch, plan) if self.fp8 else on_batch
            i = self.info
            deadline = Deadline(i.bucket_timeout_s or i.timeout_s, i.push_timeout_s,
                                abort=lambda: abort_reason(store, abort_key))
            codec = PLAIN
            if self.delta is not None and not self.transport.local_srcs:  # into the destination; deltas if told
                self.delta.prepare(plan, msg.plan)
                codec = DeltaReceive(self.delta, plan, DeltaDecision.from_json(msg.delta).on, str(self.me))
            times = receive(plan, self.transport, self.pool, msg.num_buffers, deadline, cb, wanted, str(self.me),
                            p, codec, VerdictRound(store, p, i.num_receivers, i.timeout_s, abort_key, str(self.me),
                                                   self.me.rank))
            if codec is not PLAIN:
                codec.finished(msg.version)
            if self.fp8:
                cb.finish()
        except Exception as e:
            self._give_up(p, e, traceback.format_exc(limit=3))
            raise
        state = self.delta.state() if self.delta else None
        if state is not None and state.late:
            self.delta.publish(self.delta.told())  # first: the join key is never older than the acknowledgement
        store.set(Keys.done(p, self.me.rank), wire.encode(Ack(times.apply, times.transfer, state, **self.note)))
        self._open = False
        self.version = self.whole_version = msg.version
        return ReceiveResult(msg.version, plan.total_bytes, times.transfer, times.apply)

    def _give_up(self, p: str, error: BaseException, trace: str = "") -> None:
        """Acknowledge push ``p`` with ``error`` and abort it for everyone (Sender.abort_push): the trainer ranks
        and the other receivers stop waiting at once instead of at their timeout."""
        info = ErrorInfo.of(error, receiver=self.me.rank)
        try:
            self.bridge.store.set(Keys.done(p, self.me.rank), wire.encode(Ack(error=info, trace=trace)))
            if not isinstance(error, Aborted) and not self.bridge.store.check([Keys.abort(p)]):
                self.bridge.store.set(Keys.abort(p), f"{self.me}: {info.message}")
        except torch.distributed.DistError:
            pass  # the trainer's store is gone: nobody is left to tell, and the original error is what matters

    def fail(self, error: BaseException) -> None:
        """The engine around this receiver failed outside ``receive`` (before it, or in its own apply): abort the
        push in progress, or the next one if none started, unless this receiver already reported it."""
        if self.bridge is None:
            return
        p = Keys.push(max(self.seq - 1, 0)) if self._open else Keys.push(self.seq)
        try:
            if not self.bridge.store.check([Keys.done(p, self.me.rank)]):
                self._give_up(p, error)
        except torch.distributed.DistError:
            pass  # the trainer is gone: nobody is waiting

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
        if self.rdzv is not None:
            self.rdzv.close()
            self.rdzv = None
