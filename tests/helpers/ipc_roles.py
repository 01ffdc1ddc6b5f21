"""Process bodies for the CUDA IPC tests (importable by spawned children).

On a GPU they run the real thing. On CPU (``standin=True``) the CUDA calls of ``trainer_sync.transport.cuda`` are
replaced by a host-memory stand-in (file-backed shared memory for exports, no-op events), which checks the protocol
(manifests, export re-use and release, the staged flow control, the core hooks) where CUDA IPC does not exist.
"""
from __future__ import annotations

import gc
import os
import secrets
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.protocol.messages import JoinInfo
from trainer_sync.sources.fsdp import local_tensor
from trainer_sync.transport import IpcRecv, IpcSend, cuda

MiB = 2**20


class HostIpc(cuda.CudaIpc):
    """CUDA IPC's stand-in on CPU: an export is a file_system shared-memory storage; events do nothing (CPU copies
    are synchronous). ``gpu`` is the "GPU UUID" this process reports: processes given the same one are colocated.
    Like CUDA IPC, it refuses to open a handle in the process that made it (shared memory itself would not mind)."""

    def __init__(self, gpu: str = "host-shm"):
        self.gpu = gpu

    def available(self, device):
        return device.type == "cpu"

    def default_device(self):
        return torch.device("cpu")

    def uuid(self, device):
        return self.gpu if device.type == "cpu" else ""

    def export(self, base):
        st = base.untyped_storage()
        if not st.is_shared():
            raise RuntimeError("host stand-in: only shared-memory storages can be exported (model.share_memory())")
        manager, handle, size = st._share_filename_cpu_()
        return [manager.decode(), handle.decode(), size, os.getpid()]

    def open(self, w, device):
        if w[3] == os.getpid():
            raise RuntimeError("host stand-in: like CUDA IPC, a handle cannot be opened in the process that made it")
        st = torch.UntypedStorage._new_shared_filename_cpu(w[0].encode(), w[1].encode(), w[2])
        return torch.empty(0, dtype=torch.uint8).set_(st)

    def alloc(self, nbytes, device):
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()

    def new_event(self, device):
        h = f"{os.getpid()}-{secrets.token_hex(8)}"
        return h, h

    def open_event(self, handle, device):
        if handle.split("-")[0] == str(os.getpid()):
            raise RuntimeError("host stand-in: like CUDA IPC, an event cannot be opened in the process that made it")
        return handle

    def record(self, ev, device):
        pass

    def wait(self, ev, device):
        pass

    def synchronize(self, device):
        pass

    def collect(self):
        pass


def use_standin(gpu: str = "host-shm") -> None:
    torch.multiprocessing.set_sharing_strategy("file_system")
    cuda.backend = HostIpc(gpu)


# A small model with the awkward parts: a tied embedding / LM head, odd sizes (unaligned offsets), 1-D norms, an
# empty tensor.
SHAPES = {"embed.weight": (97, 24), "layer0.w": (24, 40), "layer0.norm": (24,), "layer1.w": (13, 7),
          "layer1.empty": (0, 5), "layer2.w": (40, 24), "final_norm": (24,)}
TIED = ("lm_head.weight", "embed.weight")
# For the memory tests: 16 MiB tensors (bf16), above the caching allocator's 10 MiB limit for shared segments, so each
# lives in a segment of its own and a leaked buffer or export (16 MiB or more) cannot hide in the allocator's rounding.
BIG = {"embed.weight": (4096, 2048), **{f"layer{i}.w": (2048, 4096) for i in range(6)}, "final_norm": (2048,)}
MODELS = {"small": SHAPES, "big": BIG}


def build(dtype=torch.bfloat16, device="cpu", seed=0, shapes=SHAPES) -> torch.nn.Module:
    g = torch.Generator(device=device).manual_seed(seed)
    root = torch.nn.Module()
    for name, shape in shapes.items():
        mod = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=g, device=device).to(dtype)))
    lm = torch.nn.Module()
    lm.weight = root.embed.weight  # tied: travels once, reaches the receiver under both names
    root.add_module("lm_head", lm)
    return root


def expected(dtype: str, shapes=SHAPES) -> dict:
    out = {n: (list(s), dtype) for n, s in shapes.items()}
    out[TIED[0]] = (list(shapes[TIED[1]]), dtype)
    return out


class Barrier:
    """Both processes meet here (so that device-wide memory readings see both of them idle)."""

    def __init__(self, port: int, role: str):
        self.store = dist.TCPStore("127.0.0.1", port, is_master=role == "trainer", timeout=timedelta(seconds=120),
                                   wait_for_workers=False)
        self.role = role

    def __call__(self, name: str) -> None:
        self.store.set(f"{name}/{self.role}", "1")
        self.store.wait([f"{name}/trainer", f"{name}/receiver"])


def settle(device) -> None:
    """This process idle, with its freed blocks returned to the driver (before a device-wide memory reading)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()


def read_mem(bar, name: str, device, mem: dict, key: str) -> None:
    """Both processes settle, meet, read the device-wide free memory, and meet again before anyone moves on."""
    settle(device)
    bar(name)
    mem[key] = torch.cuda.mem_get_info(device)[0]
    mem[key + "_allocated"] = torch.cuda.memory_allocated(device)  # this process's own tensors and buffers
    bar(name + "-read")


def fingerprint(tensors) -> list[int]:
    """Bit-level checksum per tensor (equal bits -> equal numbers), computed on the device."""
    out = []
    for t in tensors:
        bits = t.detach().contiguous().view(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()])
        out.append(int((bits.to(torch.int64) * torch.arange(1, bits.numel() + 1, device=t.device)).sum()))
    return out


def trainer(rank, world, port, bar_port, device, dtype, cfg, pushes, standin=False, measure=False,
            realloc_at=None, model="small", gpu=None, linger_s=0.0):
    """Push ``pushes`` times (weights change before each); return states, fingerprints, reports, diagnostics.

    With ``world`` > 1 the model is sharded with FSDP2 over the trainer ranks (rank r on ``cuda:r`` on a GPU; on CPU
    ``gpu`` names the stand-in GPU this rank reports, to lay out colocation)."""
    if standin:
        use_standin(gpu or "host-shm")
    cfg = dict(cfg)
    num_receivers = cfg.pop("num_receivers", 1)
    device = torch.device(f"cuda:{rank}" if device == "cuda" else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build(getattr(torch, dtype), device, shapes=MODELS[model])
    if world > 1:
        _fully_shard(model, world, device)
    if standin:
        for p in model.parameters():
            local_tensor(p).share_memory_()  # moves the storage (FSDP2's padded shard buffer too) to shared memory
    bar = Barrier(bar_port, "trainer") if measure else None
    mem = {}
    g = torch.Generator(device=device).manual_seed(1 + rank)
    if measure:  # run every kernel the pushes will run once first: their code then is not counted as a leak
        _perturb(model, g, device)
        fingerprint([p.detach().to(_wire(cfg, dtype)) for p in model.parameters()])
        read_mem(bar, "start", device, mem, "baseline")
    sender = Sender(model, SyncConfig(**{"port": port if rank == 0 else 0, "token": "tok", "timeout_s": 60, **cfg}))
    sender.connect(num_receivers)
    ipc = sender.transport if isinstance(sender.transport, IpcSend) else None
    diag = {"ipc": ipc is not None, "held": [], "exports": [], "local": list(ipc.local) if ipc is not None else [],
            "group": sender.bridge.groups.get(rank) is not None}
    prints, reports = [], []
    for k in range(pushes):
        _perturb(model, g, device)
        with torch.no_grad():
            if realloc_at == k:  # the trainer replaces a parameter's storage: a new export, the old one released
                w = model.layer0.w
                if device.type == "cuda":
                    # A segment of its own for the new tensor (not a piece of a cached temporary's): else the rest of
                    # that segment stays reserved and the device-wide reading shows fragmentation, not a leak.
                    torch.cuda.empty_cache()
                fresh = torch.empty_like(w)
                fresh.copy_(w.detach() * 2)
                w.data = fresh.share_memory_() if standin else fresh
        try:
            reports.append(sender.push().to_dict())
        except Exception:
            time.sleep(linger_s)  # a trainer that handles the error keeps its rank (and rank 0 the store) up a while
            raise
        prints.append(fingerprint([t.to(_wire(cfg, dtype)) for _, t in sorted(_full(model).items())]))
        if ipc is not None:
            diag["held"].append(len(ipc._held))
            diag["exports"].append(ipc._next_id)
        if measure and k in (0, pushes - 1):
            read_mem(bar, f"push{k}", device, mem, f"after_push{k + 1}")
    state = {n: t.cpu().clone() for n, t in _full(model).items()}
    if measure:
        bar("receiver-closed")  # receivers unmap first; then the trainer's buffers are freed at once
    sender.close()
    if measure:
        read_mem(bar, "closed", device, mem, "after_close")
    return {"state": state, "prints": prints, "reports": reports, "diag": diag, "mem": mem}


def _fully_shard(model, world: int, device) -> None:
    """FSDP2 over the trainer ranks (local_cluster started their default gloo group; NCCL for CUDA shards)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        mesh = DeviceMesh.from_group(dist.new_group(backend="nccl"), "cuda")
    else:
        mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    # no copy of a plain parameter: the memory tests read this process's allocations right after
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in _named(model).items()}


def _named(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _perturb(model, g, device) -> None:
    with torch.no_grad():
        for p in model.parameters():
            t = local_tensor(p)
            t.add_(torch.randn(t.shape, generator=g, device=device).to(t.dtype))


def _wire(cfg: dict, dtype: str) -> torch.dtype:
    return getattr(torch, "bfloat16" if cfg.get("wire_dtype") == "bfloat16" else dtype)


def receiver(j, n, port, bar_port, device, dtype, backend, pushes, standin=False, measure=False, model="small",
             num_trainers=1, gpu=None, die_at=None):
    """Receive into tensors of its own (copy_ by name, as an engine would); fingerprints after each push.
    On CPU ``gpu`` names the stand-in GPU this receiver reports (colocated with the trainer ranks that report it)."""
    if standin:
        use_standin(gpu or "host-shm")
    device = torch.device(device)
    shapes = MODELS[model]
    exp = expected(dtype, shapes)
    own = {name: torch.full(shape, float("nan"), dtype=getattr(torch, dtype), device=device)
           for name, (shape, _) in exp.items()}
    bar = Barrier(bar_port, "receiver") if measure else None
    mem = {}
    if measure:
        for t in own.values():
            t.copy_(t.clone())
        fingerprint(list(own.values()))
        read_mem(bar, "start", device, mem, "baseline")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    r = Receiver(JoinInfo("127.0.0.1", port, "tok", 0, num_trainers, n, j, backend, 60.0), expected=exp,
                 device=device if not standin else None)
    r.connect()
    ipc = r.transport if isinstance(r.transport, IpcRecv) else None
    diag = {"ipc": ipc is not None, "mapped": [], "device": str(r.device),
            "srcs": list(ipc.srcs) if ipc is not None else [], "groups": sorted(r.bridge.groups)}
    seen = []
    prints = []

    def apply(batch):
        if die_at == len(diag["mapped"]):  # SIGKILL on the first batch of push ``die_at`` (0-based)
            os.kill(os.getpid(), signal.SIGKILL)
        for name, t in batch:
            own[name].copy_(t)
            seen.append(name)

    for k in range(pushes):
        seen.clear()
        r.receive(apply)
        assert sorted(seen) == sorted(exp), (sorted(seen), sorted(exp))
        prints.append(fingerprint([own[name] for name in sorted(shapes)]))
        diag["mapped"].append(len(ipc._mapped) if ipc is not None else 0)
        if measure and k in (0, pushes - 1):
            read_mem(bar, f"push{k}", device, mem, f"after_push{k + 1}")
    state = {name: t.cpu().clone() for name, t in own.items()}
    r.close()
    if measure:
        bar("receiver-closed")
        read_mem(bar, "closed", device, mem, "after_close")
    return {"state": state, "prints": prints, "diag": diag, "mem": mem}


# ---- running and checking (shared by test_ipc.py on CPU and test_ipc_gpu.py) ----------------------------------

def check_pair(t, r, wire=None) -> None:
    """Receiver ``r`` holds exactly trainer ``t``'s weights (in the wire dtype) after every push, by CUDA IPC."""
    assert t["diag"]["ipc"] and r["diag"]["ipc"], "the push did not go by CUDA IPC"
    assert t["prints"] == r["prints"]  # bit-level fingerprints after every push
    for name, want in t["state"].items():
        want = (want.to(wire) if wire is not None else want).contiguous()
        assert torch.equal(r["state"][name].view(torch.uint8), want.view(torch.uint8)), name
    assert torch.equal(r["state"]["lm_head.weight"], r["state"]["embed.weight"])  # tied alias arrived too


def run_colocated(cfg: dict, num_trainers: int, receiver_gpus: list[int], pushes: int = 3, dtype: str = "float32",
                  recv_dtype: str | None = None, standin: bool = False, backend: str = "gloo"):
    """FSDP2 over ``num_trainers`` ranks (rank r on GPU r); receiver j on GPU ``receiver_gpus[j]``. On CPU
    (``standin``) the GPUs are labels the stand-in reports. Returns (trainer results, receiver results)."""
    from .cluster import free_port, run_roles

    port, m, n = free_port(), num_trainers, len(receiver_gpus)
    cfg = dict(cfg, num_receivers=n)
    tdev = "cpu" if standin else "cuda"
    out = run_roles(
        [("trainer", r, m, trainer, (port, 0, tdev, dtype, cfg, pushes, standin, False, None, "small", f"gpu{r}"))
         for r in range(m)] +
        [("receiver", j, n, receiver, (port, 0, "cpu" if standin else f"cuda:{g}", recv_dtype or dtype, backend,
                                       pushes, standin, False, "small", m, f"gpu{g}"))
         for j, g in enumerate(receiver_gpus)], timeout=300)
    return [out[("trainer", r)] for r in range(m)], [out[("receiver", j)] for j in range(n)]


def check_colocated(ts, rs, receiver_gpus, wire=None) -> None:
    """Every receiver holds the full weights; it mapped its own GPU's trainer rank and took the others' from their
    groups; trainer ranks without a receiver on their GPU used the wire only."""
    for t in ts[1:]:
        assert t["prints"] == ts[0]["prints"]  # every rank gathered the same full weights
    for j, (r, g) in enumerate(zip(rs, receiver_gpus)):
        check_pair(ts[0], r, wire)
        assert r["diag"]["srcs"] == [g], r["diag"]  # IPC for the trainer rank on its GPU...
        assert r["diag"]["groups"] == [x for x in range(len(ts)) if x != g], r["diag"]  # ...the wire for the others
        assert j in ts[g]["diag"]["local"]
    for x, t in enumerate(ts):
        assert t["diag"]["ipc"] == (x in receiver_gpus)
        assert t["diag"]["group"] == any(g != x for g in receiver_gpus)


def same_process(rank, world, port, device, dtype, cfg, pushes, standin=False, backend="gloo"):
    """A trainer with an in-process engine (TRL's colocate mode): the trainer rank and the receiver in one process,
    the receiver in a thread. Returns (trainer result, receiver result)."""
    out: dict = {}

    def run_receiver():
        try:
            out["r"] = receiver(0, 1, port, 0, device, dtype, backend, pushes, standin)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            out["error"] = e

    th = threading.Thread(target=run_receiver)
    th.start()
    try:
        out["t"] = trainer(0, 1, port, 0, device, dtype, cfg, pushes, standin)
    finally:
        th.join(timeout=120)
    if "error" in out:
        raise out["error"]
    return out["t"], out["r"]
