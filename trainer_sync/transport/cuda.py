"""The CUDA calls of the CUDA IPC transport (ipc_send.py, ipc_recv.py), and what this process exported.

Why one object: every CUDA IPC call goes through ``backend`` (a ``CudaIpc``), a process-wide name that the tests
rebind to a host-memory stand-in (``tests/helpers/ipc_roles.py``: ``cuda.backend = HostIpc()``), which checks the
protocol on CPU where CUDA IPC does not exist. So the callers read it as ``cuda.backend`` at call time, never
``from .cuda import backend`` (that would keep the object of import time).

Handles follow the convention of vLLM's ``ipc_engine.py`` (``torch.multiprocessing.reductions.reduce_tensor`` on the
producer, ``rebuild_cuda_tensor`` with the receiver's own device index on the consumer), but travel as plain JSON in
the token-secured bridging store, never as pickles.
"""
from __future__ import annotations

import json

import torch

from ..errors import SyncError

NUM_EVENTS = 2  # "ready" / "consumed" events per trainer rank: one per bucket buffer (num_buffers is 1 or 2)


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

