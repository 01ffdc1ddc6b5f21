"""A full push and a delta push go through the same send and receive loops (pipeline/loops.py ``send`` /
``receive``): only the codec differs. In one process: the trainer's loop in a thread, the receiver's in the test,
connected by a loopback transport (a queue of frames per push) that records every call the loops make, and a real
``torch.distributed.HashStore`` for the verdict round. Every push must land bit-exact in the receiver's mirror."""
from __future__ import annotations

import queue
import threading
from datetime import timedelta

import torch

from trainer_sync.codec.delta.cache import DeltaSendState
from trainer_sync.codec.delta.codec import DeltaReceive, DeltaSend
from trainer_sync.codec.delta.destination import DeltaDestination
from trainer_sync.errors import Deadline
from trainer_sync.pipeline.loops import BufferPool, receive, send
from trainer_sync.pipeline.verdict import VerdictRound
from trainer_sync.plan.buckets import plan_buckets
from trainer_sync.plan.delta_policy import DeltaDecision
from trainer_sync.sources import ModuleSource
from trainer_sync.transport.base import RecvTransport, SendTransport


class Done:
    """A Work whose bytes are copied when it is waited for (the frame is taken off the queue then)."""

    def __init__(self, fill):
        self.fill = fill

    def is_completed(self):
        return True

    def wait(self, timeout: timedelta):
        self.fill(timeout.total_seconds())
        return True


class LoopSend(SendTransport):
    def __init__(self, frames: queue.Queue, calls: list):
        self.frames, self.calls = frames, calls

    def begin(self, push, plan, source, num_buffers):
        self.bufs = [torch.empty(plan.max_bucket_bytes, dtype=torch.uint8) for _ in range(num_buffers)]
        self.calls.append(("begin",))
        return True

    def make_room(self, bucket, rnd, times, deadline):
        self.calls.append(("make_room", bucket.index))

    def buffer(self, bucket, rnd, times, deadline):
        self.calls.append(("buffer", bucket.index))
        return self.bufs[rnd % len(self.bufs)]

    def post(self, bucket, data):
        raise AssertionError("the send loop posts frames")

    def post_frames(self, bucket, frames):
        self.calls.append(("post", bucket.index))
        for f in frames:
            self.frames.put(f.clone())

    def drain(self, times, deadline):
        self.calls.append(("drain",))


class LoopRecv(RecvTransport):
    def __init__(self, frames: queue.Queue, calls: list):
        self.frames, self.calls = frames, calls

    def post(self, bucket, buf):
        self.calls.append(("post", bucket.index))

        def fill(timeout_s):
            got = self.frames.get(timeout=timeout_s)
            assert got.numel() == buf.numel(), (bucket.index, got.numel(), buf.numel())
            buf.copy_(got)
        return Done(fill)


def _push(plan, source, state, dest, decision, version, store, p):
    """One push through both loops; returns (trainer calls, receiver calls, trainer codec, receiver codec)."""
    frames, sent_calls, recv_calls = queue.Queue(), [], []
    state.begin(plan.to_json(), plan)
    out = DeltaSend(state, decision, plan, 0)
    dest.prepare(plan, plan.to_json())
    inn = DeltaReceive(dest, plan, decision.on, "receiver 0")
    errors = []

    def trainer():
        try:
            send(plan, source, LoopSend(frames, sent_calls), 2, Deadline(10.0), p, codec=out,
                 verdict=VerdictRound(store, p, 1, 10.0, f"{p}/abort", "trainer rank 0"))
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
    t = threading.Thread(target=trainer)
    t.start()
    got = {}
    receive(plan, LoopRecv(frames, recv_calls), BufferPool(torch.device("cpu")), 2, Deadline(10.0),
            lambda batch: got.update((n, x.clone()) for n, x in batch), None, "receiver 0", p, inn,
            VerdictRound(store, p, 1, 10.0, f"{p}/abort", "receiver 0", 0))
    t.join()
    assert not errors, errors
    inn.finished(version)
    state.commit(version)
    assert frames.empty()
    return sent_calls, recv_calls, out, got


def test_full_and_delta_pushes_share_the_loops_and_land_bit_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    source = ModuleSource(model, rank=0, world=1)
    pieces = source.pieces()
    plan = plan_buckets(pieces, 1, 4096, {x.name: x.dtype for x in pieces}, {})
    assert len(plan.buckets) > 2
    store = torch.distributed.HashStore()
    state, dest = DeltaSendState("auto", None), DeltaDestination("auto", None, None, torch.device("cpu"))
    want = lambda: {n: t.detach().clone() for n, t in model.state_dict().items()}  # noqa: E731

    full = _push(plan, source, state, dest, DeltaDecision(False, 0, "first push", True), 1, store, "push/0")
    assert full[3].keys() == want().keys() and all(torch.equal(full[3][n], t) for n, t in want().items())
    with torch.no_grad():
        model[0].weight[3, :5] += 1.0  # a few elements change
    delta = _push(plan, source, state, dest, DeltaDecision(True, 1, None, True), 2, store, "push/1")
    assert delta[2].stats.sent < delta[2].stats.full / 4 and delta[2].stats.full_reason is None
    assert all(torch.equal(delta[3][n], t) for n, t in want().items())
    assert dest.version == 2 and all(torch.equal(dest.dest[n].view(t.shape), t) for n, t in want().items())

    # The trainer's loop makes the same calls for both kinds; the receiver's posts a second frame (the body) only
    # where a bucket changed, in the same order of buckets.
    assert full[0] == delta[0]
    once = [c for i, c in enumerate(delta[1]) if i == 0 or c != delta[1][i - 1]]
    assert once == full[1] and len(full[1]) < len(delta[1]) < 2 * len(full[1])


def test_a_refused_delta_is_sent_again_full_by_the_same_loops():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    source = ModuleSource(model, rank=0, world=1)
    pieces = source.pieces()
    plan = plan_buckets(pieces, 1, 1024, {x.name: x.dtype for x in pieces}, {})
    store = torch.distributed.HashStore()
    state, dest = DeltaSendState("auto", None), DeltaDestination("auto", None, None, torch.device("cpu"))
    _push(plan, source, state, dest, DeltaDecision(False, 0, "first push", True), 1, store, "push/0")
    dest.dest[plan.buckets[-1].slots[0].name][0] += 1  # the receiver no longer holds the base of the last bucket
    with torch.no_grad():
        model[1].bias += 0.5
    sent, _, out, got = _push(plan, source, state, dest, DeltaDecision(True, 1, None, True), 2, store, "push/1")
    assert out.stats.full_reason.startswith("delta refused, resent full: receiver 0: bucket")
    assert sent.count(("begin",)) == 1 and sent.count(("drain",)) == 2  # one loop, two passes
    want = {n: t.detach() for n, t in model.state_dict().items()}
    assert got.keys() == want.keys() and all(torch.equal(got[n], t) for n, t in want.items())
    assert all(torch.equal(dest.dest[n].view(t.shape), t) for n, t in want.items())
