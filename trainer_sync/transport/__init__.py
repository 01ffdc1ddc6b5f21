"""Transport: how buckets move between trainer ranks and receivers (the interface and its kinds: base.py).

``group.py`` forms the rendezvous and the bridging groups of an epoch and ``layout.py`` decides which hop goes by
CUDA IPC; ``open_send`` / ``open_recv`` then pick the transport of one member for that epoch from the layout."""
from __future__ import annotations

import torch

from .base import BufferPool, RecvTransport, SendTransport
from .group import BridgeGroup, Member
from .ipc_recv import IpcRecv
from .ipc_send import IpcSend
from .wire import WireRecv, WireSend


def open_send(bridge: BridgeGroup, rank: int, device: torch.device, pool: BufferPool, timeout_s: float,
              ipc_direct: bool = True) -> SendTransport:
    """Trainer rank ``rank``'s transport: CUDA IPC when the layout puts receivers on its GPU (with the wire for the
    others, if any), else the wire (its group)."""
    group = bridge.groups.get(rank)  # None when every receiver is on this rank's GPU
    local = bridge.layout.local[rank] if bridge.layout is not None else ()
    if local:
        wire = WireSend(group, pool, rank) if group is not None else None
        return IpcSend(bridge.store, rank, local, bridge.num_receivers, device, timeout_s, ipc_direct, wire)
    return WireSend(group, pool, rank)


def open_recv(bridge: BridgeGroup, me: Member, device: torch.device, timeout_s: float) -> RecvTransport:
    """Receiver ``me``'s transport: CUDA IPC for the trainer ranks on its GPU (the wire for the others), else the
    wire (one group per trainer rank)."""
    srcs = bridge.layout.local_srcs(me.rank) if bridge.layout is not None else ()
    if srcs:
        return IpcRecv(bridge.store, me, srcs, bridge.num_receivers, device, timeout_s, bridge.groups)
    return WireRecv(bridge.groups)


__all__ = ["SendTransport", "RecvTransport", "WireSend", "WireRecv", "IpcSend", "IpcRecv", "open_send", "open_recv"]
