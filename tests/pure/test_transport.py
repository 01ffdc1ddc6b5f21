"""The transport interface (transport/base.py) without processes: which kind a member gets from the epoch's layout,
and the order in which the pipeline's send loop calls a transport (a recording stand-in, on CPU tensors)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from trainer_sync.errors import Deadline
from trainer_sync.pipeline.loops import BufferPool, send
from trainer_sync.plan.buckets import plan_buckets
from trainer_sync.sources import ModuleSource
from trainer_sync.transport import IpcRecv, IpcSend, SendTransport, WireRecv, WireSend, open_recv, open_send
from trainer_sync.transport.group import Member
from trainer_sync.transport.layout import plan_layout


def _bridge(layout, groups):
    return SimpleNamespace(layout=layout, groups=groups, store=None, num_receivers=layout.num_receivers)


def test_the_layout_picks_each_members_transport():
    cpu, pool = torch.device("cpu"), BufferPool(torch.device("cpu"))
    mixed = plan_layout("auto", ["GPU-a", "GPU-b"], ["GPU-a"], "nccl")  # rank 0 by IPC, rank 1 over its group
    rank0 = open_send(_bridge(mixed, {}), 0, cpu, pool, 1.0)
    assert isinstance(rank0, IpcSend) and rank0.local == (0,) and rank0.wire is None and not rank0.serves_catchup
    rank1 = open_send(_bridge(mixed, {1: "group"}), 1, cpu, pool, 1.0)
    assert isinstance(rank1, WireSend) and rank1.group == "group" and rank1.serves_catchup
    receiver = open_recv(_bridge(mixed, {1: "group"}), Member("receiver", 0), cpu, 1.0)
    assert isinstance(receiver, IpcRecv) and receiver.local_srcs == {0} and receiver.groups == {1: "group"}

    both = plan_layout("auto", ["GPU-a", "GPU-b"], ["GPU-a", "GPU-b"], "nccl")  # an engine on each GPU
    rank0 = open_send(_bridge(both, {0: "group0"}), 0, cpu, pool, 1.0)
    assert isinstance(rank0, IpcSend) and rank0.wire.group == "group0"  # receiver 1 over the wire, same push

    apart = plan_layout("auto", ["GPU-a"], ["GPU-b"], "nccl")
    assert isinstance(open_send(_bridge(apart, {0: "g"}), 0, cpu, pool, 1.0), WireSend)
    assert isinstance(open_recv(_bridge(apart, {0: "g"}), Member("receiver", 0), cpu, 1.0), WireRecv)


class Recording(SendTransport):
    """Keeps what it is handed, in the order the loop calls it."""

    def __init__(self, num_buffers):
        self.calls, self.sent, self.bufs = [], {}, [torch.zeros(1024, dtype=torch.uint8) for _ in range(num_buffers)]

    def begin(self, push, plan, source, num_buffers):
        self.calls.append(("begin", push))
        return True

    def make_room(self, bucket, rnd, times, deadline):
        self.calls.append(("make_room", bucket.index))

    def buffer(self, bucket, rnd, times, deadline):
        self.calls.append(("buffer", bucket.index))
        return self.bufs[rnd % len(self.bufs)]

    def packed(self, bucket, buf):
        self.calls.append(("packed", bucket.index))

    def post(self, bucket, data):
        self.calls.append(("post", bucket.index))
        self.sent[bucket.index] = data.clone()

    def drain(self, times, deadline):
        self.calls.append(("drain",))


def test_send_loop_calls_the_transport_per_bucket_and_packs_the_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    source = ModuleSource(model, rank=0, world=1)
    pieces = source.pieces()
    plan = plan_buckets(pieces, 1, 128, {p.name: p.dtype for p in pieces}, {})
    assert len(plan.buckets) > 1
    transport = Recording(2)
    send(plan, source, transport, 2, Deadline(5.0), push="push/0")
    per_bucket = [c for b in plan.buckets for c in
                  [("make_room", b.index), ("buffer", b.index), ("packed", b.index), ("post", b.index)]]
    assert transport.calls == [("begin", "push/0"), *per_bucket, ("drain",)]
    for b in plan.buckets:  # every slot's bytes at its offset, as pack_bucket lays them out
        for s in b.slots:
            want = source.flat(s.name)[s.start:s.start + s.numel].contiguous().view(torch.uint8)
            assert torch.equal(transport.sent[b.index][s.offset:s.offset + want.numel()], want), s.name
