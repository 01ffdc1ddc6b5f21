"""Which hop goes by which transport: every member of an epoch reports its GPU, trainer rank 0 decides.

Why per hop and not one mode for the whole cluster: in colocated (hybrid) RL the trainer is sharded over several GPUs
(FSDP2) and an engine worker sits on one of them. NCCL refuses two ranks of one GPU in one communicator, so the shard
of the trainer rank on the worker's own GPU cannot go through NCCL, and the shards of the other GPUs cannot go
through CUDA IPC. So each (trainer rank, receiver) hop is "local" (same GPU: CUDA IPC, transport/ipc_send.py) or
"remote" (the trainer rank's NCCL/gloo group, which then holds only the receivers that are not on its GPU).

``plan_layout`` is the pure decision (unit-tested without processes); ``agree_layout`` runs it on trainer rank 0 and
hands every member the same answer through the epoch's store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import SyncError
from ..protocol import wire
from ..protocol.messages import ErrorInfo, ErrorKind, Keys, LayoutAnnouncement
from .group import Member, wait_keys

LAYOUT_KEY = Keys.LAYOUT


@dataclass(frozen=True)
class Layout:
    """``local[r]``: the receivers on trainer rank r's GPU (CUDA IPC); every other receiver is remote to rank r."""

    num_receivers: int
    local: tuple[tuple[int, ...], ...]

    @property
    def mode(self) -> str:
        """"ipc" (every hop local), "mixed" (some local, some remote) or "broadcast" (no hop local)."""
        hops = sum(len(x) for x in self.local)
        return "broadcast" if hops == 0 else "ipc" if hops == len(self.local) * self.num_receivers else "mixed"

    def remote(self, r: int) -> tuple[int, ...]:
        """Receivers in trainer rank r's group, in group-rank order (group rank 1 + index)."""
        return tuple(j for j in range(self.num_receivers) if j not in self.local[r])

    def local_srcs(self, j: int) -> tuple[int, ...]:
        """Trainer ranks whose buckets receiver j maps by CUDA IPC."""
        return tuple(r for r, rs in enumerate(self.local) if j in rs)

    def to_json(self) -> str:
        return json.dumps({"n": self.num_receivers, "local": [list(x) for x in self.local]})

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        d = json.loads(text)
        return cls(d["n"], tuple(tuple(x) for x in d["local"]))


def plan_layout(configured: str, trainer_gpus: list[str], receiver_gpus: list[str], backend: str) -> Layout:
    """Decide the transport of every hop from each member's GPU UUID ("" for none). Raises ValueError naming the
    members when the configured mode cannot work on these GPUs.

    * "auto": CUDA IPC wherever a trainer rank and a receiver share a GPU, the bridging group everywhere else.
    * "ipc": the same, but every receiver must share its GPU with some trainer rank (colocated is what was asked).
    * "broadcast" / "p2p": no IPC; refused when NCCL would need two ranks of one GPU.
    Either way a group must not put two of its members on one GPU when it is NCCL (it would fail inside NCCL, late
    and obscurely).
    """
    m, n = len(trainer_gpus), len(receiver_gpus)
    shared = tuple(tuple(j for j in range(n) if receiver_gpus[j] and receiver_gpus[j] == trainer_gpus[r])
                   for r in range(m))
    if configured == "ipc":
        alone = [j for j in range(n) if not any(j in s for s in shared)]
        if alone:
            raise ValueError("mode='ipc' needs every receiver on the GPU of a trainer rank, but " + ", ".join(
                f"receiver {j} is on {receiver_gpus[j] or 'no GPU'}" for j in alone) + " (trainer ranks: " +
                ", ".join(f"{r} on {u or 'no GPU'}" for r, u in enumerate(trainer_gpus)) + ")")
    local = shared if configured in ("auto", "ipc") else tuple(() for _ in range(m))
    layout = Layout(n, local)
    if backend == "nccl":
        for r in range(m):
            members = [(f"trainer rank {r}", trainer_gpus[r])] + \
                      [(f"receiver {j}", receiver_gpus[j]) for j in layout.remote(r)]
            by_gpu: dict[str, list[str]] = {}
            for who, gpu in members:
                if gpu:
                    by_gpu.setdefault(gpu, []).append(who)
            clash = {gpu: whos for gpu, whos in by_gpu.items() if len(whos) > 1}
            if clash:
                hint = ("use mode='auto' or 'ipc' so that a trainer rank reaches receivers on its own GPU by CUDA IPC"
                        if configured not in ("auto", "ipc") else "give each receiver a GPU of its own")
                raise ValueError(f"NCCL cannot put two ranks of one GPU in trainer rank {r}'s group: " + "; ".join(
                    f"{' and '.join(whos)} are on {gpu}" for gpu, whos in clash.items()) + f" ({hint})")
    return layout


def agree_layout(store: dist.Store, me: Member, configured: str, gpu: str, num_trainers: int, num_receivers: int,
                 backend: str, timeout_s: float) -> Layout:
    """Every member of an epoch calls this once, right after authentication and before any group forms; all get the
    same Layout (or the same error)."""
    store.set(f"gpu/{me.key}", gpu)
    if me == Member("trainer", 0):
        members = [Member("trainer", r) for r in range(num_trainers)] + \
                  [Member("receiver", j) for j in range(num_receivers)]
        keys = [f"gpu/{x.key}" for x in members]
        missing = wait_keys(store, keys, timeout_s)
        if missing:
            msg = f"no GPU report from {', '.join(missing)} within {timeout_s:g}s"
            _announce(store, error=ErrorInfo(ErrorKind.FAILED, msg, stage="rendezvous"))
            raise SyncError(f"trainer rank 0: {msg}", stage="rendezvous")
        gpus = [store.get(k).decode() for k in keys]
        try:
            layout = plan_layout(configured, gpus[:num_trainers], gpus[num_trainers:], backend)
        except ValueError as e:
            _announce(store, error=ErrorInfo(ErrorKind.FAILED, str(e), stage="rendezvous"))
            raise SyncError(str(e), stage="rendezvous") from None
        _announce(store, layout=layout.to_json())
        return layout
    if wait_keys(store, [LAYOUT_KEY], timeout_s):
        raise SyncError(f"{me}: trainer rank 0 announced no transport within {timeout_s:g}s", stage="rendezvous",
                        who="trainer rank 0")
    announced = wire.decode(store.get(LAYOUT_KEY), LayoutAnnouncement, stage="rendezvous")
    if announced.error is not None:
        raise SyncError(f"{me}: {announced.error.message}", stage="rendezvous", who=str(me))
    return Layout.from_json(announced.layout)


def _announce(store: dist.Store, layout: str | None = None, error: ErrorInfo | None = None) -> None:
    store.set(LAYOUT_KEY, wire.encode(LayoutAnnouncement(layout, error)))
