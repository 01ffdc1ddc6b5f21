"""Multi-GPU push benchmark (issue 9): trainer ranks on some GPUs, receivers on the others, NCCL bridging groups.

Per model (Qwen3-8B-shaped bf16, 16.38 GB, 399 tensors; Qwen3-32B-shaped bf16, 65.5 GB, 707 tensors), on the same
GPUs and with the same bytes, in one run:

  * ``plain``: trainer_sync ``Sender``/``Receiver`` (backend nccl): FSDP2 trainer ranks each send their own shard;
    every receiver gets the whole model and keeps its tp shard (what a vLLM TP worker does with a full push;
    ``tp_shards.py``);
  * ``ce``: checkpoint-engine 0.4.2 ``ParameterServer`` broadcast on the receiver GPUs (one parameter server per
    GPU, 1/N of the checkpoint registered on each, the worker on the same GPU applies through its
    ``update_weights_from_ipc`` with the same apply function), if ``checkpoint_engine`` imports.

``--colocate`` is the hybrid (colocated) layout instead: a trainer rank on every GPU and receiver j on trainer rank
j's GPU; ``plain`` then maps the local shard by CUDA IPC and takes the other GPUs' shards over NCCL in the same push,
``ce`` is checkpoint-engine's own colocated setup on the same GPUs.

All of them leave each receiver holding exactly its tp shard; after the timed pushes every receiver's shard is checked
bit for bit against the trainer's weights (regenerated deterministically on the receiver). Push seconds are wall
time on trainer rank 0 from a barrier to every receiver's ``cuda.synchronize()`` after applying (checkpoint-engine:
``update()`` on rank 0). Reported per method: push seconds (median of --iters after a warm-up), bytes each receiver
GPU received, receive GB/s (those bytes / push seconds), effective GB/s (model bytes / push seconds), and the
simulator's estimate for the same configuration (full pushes, and on paper TP-aware ones: each receiver sent only the
shard it keeps).

    python -m benchmarks.bench_multi_gpu                          # all visible GPUs, half trainers, both models
    python -m benchmarks.bench_multi_gpu --gpus 4 --models qwen3_8b --tp 2
    python -m benchmarks.bench_multi_gpu --dry-run                # plan + simulator only, no processes
    python -m benchmarks.bench_multi_gpu --device cpu --small     # the same logic on gloo with a tiny model

On the device machine carry the checkpoint-engine wheel (``.whl/checkpoint_engine-0.4.2-py3-none-any.whl``; it also
needs pyzmq, loguru, pydantic, fastapi, uvicorn, httpx) and pip install it before running.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from benchmarks.simulate import Hardware, Workload, simulate_checkpoint_engine, simulate_trainer_sync
from benchmarks.tp_shards import shard_numel, shard_slice
from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.protocol.messages import JoinInfo
from trainer_sync.sources.fsdp import local_tensor
from trainer_sync.testing.local_cluster import free_port, outcomes
from benchmarks.common import emit, parser

SHAPES = {
    "qwen3_8b": dict(layers=36, hidden=4096, heads=32, kv=8, head_dim=128, inter=12288, vocab=151936),
    "qwen3_32b": dict(layers=64, hidden=5120, heads=64, kv=8, head_dim=128, inter=25600, vocab=151936),
    "small": dict(layers=2, hidden=64, heads=8, kv=2, head_dim=8, inter=96, vocab=1000),
}
TIMEOUT = 600.0


# ---- the model: checkpoint names and shapes, deterministic weights -------------------------------------------

def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    s = SHAPES[shape]
    h, hd = s["hidden"], s["head_dim"]
    out = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (s["heads"] * hd, h),
                    p + "self_attn.k_proj.weight": (s["kv"] * hd, h), p + "self_attn.v_proj.weight": (s["kv"] * hd, h),
                    p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                    p + "self_attn.o_proj.weight": (h, s["heads"] * hd), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (s["inter"], h), p + "mlp.up_proj.weight": (s["inter"], h),
                    p + "mlp.down_proj.weight": (h, s["inter"])})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (s["vocab"], h)
    return out


def initial(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def train_step(t: torch.Tensor) -> None:
    """One 'optimizer step': elementwise, so a shard and the full tensor change bit-identically."""
    t.mul_(0.99).add_(0.001)


def expected(name, shape, dtype, device, pushes: int) -> torch.Tensor:
    t = initial(name, shape, dtype, device)
    for _ in range(pushes):
        train_step(t)
    return t


class CkptModel(torch.nn.Module):
    """A module whose named_parameters() are exactly the checkpoint names (nested plain modules)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))


# ---- placement ------------------------------------------------------------------------------------------------

def receiver_gpu(cfg: dict, j: int) -> int:
    """Receivers on GPUs of their own after the trainer's, or (--colocate) receiver j on trainer rank j's GPU."""
    return j if cfg.get("colocate") else cfg["m"] + j


def device_of(cfg: dict, role: str, rank: int) -> torch.device:
    if cfg["device"] != "cuda":
        return torch.device("cpu")
    gpu = rank if role == "trainer" else receiver_gpu(cfg, rank)
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def dtype_of(cfg) -> torch.dtype:
    return getattr(torch, cfg["dtype"])


def build_trainer_model(cfg: dict, rank: int, world: int, device: torch.device) -> torch.nn.Module:
    dtype = dtype_of(cfg)
    model = CkptModel({n: initial(n, s, dtype, device) for n, s in tensor_shapes(cfg["shape"]).items()})
    if cfg["fsdp"]:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # one trainer rank: local_cluster starts no default group for it
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if device.type == "cuda":
            mesh = DeviceMesh.from_group(dist.new_group(backend="nccl"), "cuda")
        else:
            mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def client_store(cfg: dict) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", cfg["store_port"], is_master=False, timeout=timedelta(seconds=TIMEOUT))


def shard_of(cfg: dict, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """The slab of ``full`` that tp rank ``tp_rank`` keeps (vLLM's layout)."""
    s = SHAPES[cfg["shape"]]
    cut = shard_slice(name, tuple(full.shape), s["heads"], s["kv"], cfg["tp"], tp_rank)
    if cut is None:
        return full
    dim, lo, hi = cut
    return full.narrow(dim, lo, hi - lo)


def make_sink(cfg: dict, j: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What receiver j holds: its tp shard of every tensor (as a TP engine worker does)."""
    t = j % cfg["tp"]
    dtype = dtype_of(cfg)
    out = {}
    for name, shape in tensor_shapes(cfg["shape"]).items():
        meta = torch.empty(shape, dtype=dtype, device="meta")
        out[name] = torch.empty(shard_of(cfg, name, meta, t).shape, dtype=dtype, device=device)
    return out


def verify_sink(cfg: dict, j: int, sink: dict, device: torch.device, pushes: int) -> list[str]:
    """Names whose shard differs from the trainer's weights after ``pushes`` training steps (empty: all equal)."""
    bad = []
    for name, shape in tensor_shapes(cfg["shape"]).items():
        want = shard_of(cfg, name, expected(name, shape, dtype_of(cfg), device, pushes), j % cfg["tp"])
        if not torch.equal(sink[name], want):
            bad.append(name)
    return bad


def apply_full(cfg, sink, tp_rank):
    """The receiver's apply for full tensors: keep this tp rank's slab (vLLM's weight_loader narrows the same way)."""
    def on_batch(batch):
        for name, t in batch:
            sink[name].copy_(shard_of(cfg, name, t, tp_rank))
    return on_batch


def median(xs):
    return statistics.median(xs) if xs else None


# ---- plain trainer_sync push ----------------------------------------------------------------------------------

def train_then_start_clock(model, device, world: int) -> float:
    """A stand-in training step on every local shard, then all trainer ranks start the clock together."""
    with torch.no_grad():
        for p in model.parameters():
            train_step(local_tensor(p))
    sync(device)
    if world > 1:
        dist.barrier()
    return time.perf_counter()


def trainer_plain(rank, world, cfg):
    device = device_of(cfg, "trainer", rank)
    model = build_trainer_model(cfg, rank, world, device)
    store = client_store(cfg)
    sender = Sender(model, SyncConfig(port=cfg["port"] if rank == 0 else 0, token="bench", timeout_s=TIMEOUT,
                                      bucket_mb=cfg["bucket_mb"], backend=cfg["backend"],
                                      mode="auto" if cfg.get("colocate") else "broadcast"))
    sender.connect(cfg["n"])
    times, reports = [], []
    for i in range(cfg["iters"] + 1):
        t0 = train_then_start_clock(model, device, world)
        rep = sender.push()
        if rank == 0:
            store.wait([f"plain/{i}/synced/{j}" for j in range(cfg["n"])], timedelta(seconds=TIMEOUT))
        times.append(time.perf_counter() - t0)
        reports.append(rep.to_dict())
    sender.close()
    return {"push_s": times[1:], "bytes": reports[-1]["bytes"], "report": reports[-1]}


def receiver_plain(j, n, cfg):
    device = device_of(cfg, "receiver", j)
    store = client_store(cfg)
    sink = make_sink(cfg, j, device)
    r = Receiver(JoinInfo("127.0.0.1", cfg["port"], "bench", 0, cfg["m"], n, j, cfg["backend"], TIMEOUT),
                 device=device)
    r.connect()
    on_batch = apply_full(cfg, sink, j % cfg["tp"])
    nbytes = 0
    for i in range(cfg["iters"] + 1):
        res = r.receive(on_batch)
        sync(device)
        store.set(f"plain/{i}/synced/{j}", "1")
        nbytes = res.bytes
    r.close()
    return {"bytes": nbytes, "mismatches": verify_sink(cfg, j, sink, device, cfg["iters"] + 1)}


# ---- checkpoint-engine 0.4.2 broadcast ------------------------------------------------------------------------

def _ce_env(cfg, rank):
    # Before any CUDA call in this process: checkpoint-engine takes local rank = rank % gpu_count as its device.
    os.environ["CUDA_VISIBLE_DEVICES"] = str(receiver_gpu(cfg, rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["ce_port"]), RANK=str(rank),
                      WORLD_SIZE=str(cfg["n"]))


def ce_server(rank, world, cfg):
    _ce_env(cfg, rank)
    from checkpoint_engine.ps import ParameterServer

    store = client_store(cfg)
    device = torch.device("cuda", 0)
    ps = ParameterServer(rank=rank, world_size=world, gpu_count=1)
    names = sorted(tensor_shapes(cfg["shape"]))
    mine = names[rank::world]  # 1/N of the checkpoint per rank, whole tensors
    shapes = tensor_shapes(cfg["shape"])
    # the trainer's weights after the pushes the other methods made, brought to host memory (D2H) on this rank
    t0 = time.perf_counter()
    named = {n: expected(n, shapes[n], dtype_of(cfg), device, cfg["iters"] + 1).cpu() for n in mine}
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ps.register_checkpoint("bench", named_tensors=named, use_shared_memory_pool=True)
    register_s = time.perf_counter() - t0
    ps.gather_metas("bench")
    store.wait([f"ce/ready/{rank}"], timedelta(seconds=TIMEOUT))  # the worker allocated its weights first
    times = []
    for i in range(cfg["iters"] + 1):
        def req(socket_paths, i=i):
            store.set(f"ce/{i}/paths/{rank}", json.dumps([list(x) for x in socket_paths]))
        t0 = time.perf_counter()
        ps.update("bench", req)
        times.append(time.perf_counter() - t0)
        store.wait([f"ce/{i}/done/{rank}"], timedelta(seconds=TIMEOUT))
    return {"push_s": times[1:], "register_s": register_s, "generate_and_d2h_s": gen_s}


def ce_worker(rank, world, cfg):
    _ce_env(cfg, rank)
    import zmq
    from checkpoint_engine.worker import update_weights_from_ipc

    store = client_store(cfg)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    sink = make_sink(cfg, rank, device)
    uuid = f"GPU-{torch.cuda.get_device_properties(0).uuid!s}"
    store.set(f"ce/ready/{rank}", "1")
    ctx = zmq.Context()
    on_batch = apply_full(cfg, sink, rank % cfg["tp"])
    for i in range(cfg["iters"] + 1):
        store.wait([f"ce/{i}/paths/{rank}"], timedelta(seconds=TIMEOUT))
        paths = dict(tuple(x) for x in json.loads(store.get(f"ce/{i}/paths/{rank}")))
        update_weights_from_ipc(ctx, paths[uuid], 0, run=on_batch)
        torch.cuda.synchronize()
        store.set(f"ce/{i}/done/{rank}", "1")
    full = sum(math.prod(s) for s in tensor_shapes(cfg["shape"]).values()) * dtype_of(cfg).itemsize
    return {"bytes": full, "mismatches": verify_sink(cfg, rank, sink, device, cfg["iters"] + 1)}


# ---- driver -----------------------------------------------------------------------------------------------------

def run_method(method: str, cfg: dict) -> dict:
    cfg = dict(cfg, port=free_port(), ce_port=free_port(), store_port=free_port())
    m, n = cfg["m"], cfg["n"]
    store = dist.TCPStore("127.0.0.1", cfg["store_port"], is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=TIMEOUT))
    if method == "plain":
        roles = [("trainer", r, m, trainer_plain, (cfg,)) for r in range(m)] + \
                [("receiver", j, n, receiver_plain, (cfg,)) for j in range(n)]
    else:
        roles = [("ce", r, n, ce_server, (cfg,)) for r in range(n)] + \
                [("ce_worker", r, n, ce_worker, (cfg,)) for r in range(n)]
    t0 = time.perf_counter()
    out = outcomes(roles, timeout=cfg["timeout"])
    wall = time.perf_counter() - t0
    del store
    errors = {f"{role} {rank}": value[-3000:] for (role, rank), (status, value) in out.items() if status != "ok"}
    if errors:
        return {"method": method, "error": errors, "wall_s": round(wall, 1)}
    res = {k: v[1] for k, v in out.items()}
    lead = res[("trainer", 0)] if method != "ce" else res[("ce", 0)]
    recv = [res[("receiver", j)] if method != "ce" else res[("ce_worker", j)] for j in range(n)]
    push = median(lead["push_s"])
    full = sum(math.prod(s) for s in tensor_shapes(cfg["shape"]).values()) * dtype_of(cfg).itemsize
    row = {"method": method, "push_s": round(push, 4), "push_s_all": [round(x, 4) for x in lead["push_s"]],
           "bytes_per_receiver": [r["bytes"] for r in recv],
           "receive_GBps_per_gpu": [round(r["bytes"] / push / 1e9, 2) for r in recv],
           "effective_GBps": round(full / push / 1e9, 2),
           "bit_exact": all(not r["mismatches"] for r in recv),
           "mismatches": {j: r["mismatches"][:5] for j, r in enumerate(recv) if r["mismatches"]},
           "wall_s": round(wall, 1)}
    if method == "ce":
        row["register_s"] = round(lead["register_s"], 3)
    return row


def simulated(cfg: dict, full_bytes: int, spec: dict) -> dict:
    w = Workload(full_bytes, num_gpus=cfg["n"], tp=cfg["tp"], trainer_gpus=cfg["m"], **spec)
    hw = Hardware()
    return {"trainer_sync_full_s": round(simulate_trainer_sync(w, hw, tp_aware=False).seconds, 4),
            "trainer_sync_tp_s": round(simulate_trainer_sync(w, hw, tp_aware=True).seconds, 4),
            "checkpoint_engine_s": round(simulate_checkpoint_engine(w, hw).seconds, 4)}


def shard_bytes_per_receiver(cfg: dict) -> list[int]:
    """Bytes of the tp shard each receiver keeps: what a TP-aware push would send it (on paper)."""
    s, size = SHAPES[cfg["shape"]], dtype_of(cfg).itemsize
    return [sum(shard_numel(name, shape, s["heads"], s["kv"], cfg["tp"], j % cfg["tp"]) * size
                for name, shape in tensor_shapes(cfg["shape"]).items()) for j in range(cfg["n"])]


def dry_plan(cfg: dict) -> dict:
    """What a run would do, without processes: placement, the shard each receiver keeps, the simulator's estimate."""
    shapes = tensor_shapes(cfg["shape"])
    size = dtype_of(cfg).itemsize
    full = sum(math.prod(v) for v in shapes.values()) * size
    s = SHAPES[cfg["shape"]]
    whole = sum(math.prod(v) for k, v in shapes.items() if shard_slice(k, v, s["heads"], s["kv"], 2, 0) is None)
    kv = sum(math.prod(v) for k, v in shapes.items() if "k_proj" in k or "v_proj" in k)
    spec = {"replicated_bytes": whole * size, "kv_bytes": kv * size, "num_kv_heads": s["kv"],
            "num_tensors": len(shapes), "bucket_bytes": cfg["bucket_mb"] * 2**20}
    return {"trainer_gpus": list(range(cfg["m"])) if cfg["device"] == "cuda" else f"{cfg['m']} cpu processes",
            "receiver_gpus": [receiver_gpu(cfg, j) for j in range(cfg["n"])] if cfg["device"] == "cuda" else
                             f"{cfg['n']} cpu processes",
            "tensors": len(shapes), "full_bytes": full, "shard_bytes_per_receiver": shard_bytes_per_receiver(cfg),
            "simulated": simulated(cfg, full, spec)}


def have_checkpoint_engine() -> str | None:
    try:
        import checkpoint_engine  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny Qwen3-shaped model (logic check)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the simulator's estimate only")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs (cpu: processes) in all; default: all visible")
    ap.add_argument("--trainers", type=int, default=None, help="trainer ranks (default: half)")
    ap.add_argument("--tp", type=int, default=None, help="tp size of the receivers' engine (default: receivers)")
    ap.add_argument("--models", default="qwen3_8b,qwen3_32b")
    ap.add_argument("--methods", default="plain,ce")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-fsdp", action="store_true", help="plain modules on the trainer ranks")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--colocate", action="store_true",
                    help="hybrid layout: a trainer rank on every GPU, receiver j on trainer rank j's GPU (plain: CUDA "
                         "IPC for the local shard, NCCL for the others; ce: its colocated parameter servers)")
    args = ap.parse_args(argv)
    if args.device == "cpu" or args.small:
        gpus = args.gpus or 4
    else:
        gpus = args.gpus or torch.cuda.device_count()
    if gpus < 2 and not args.dry_run:
        raise SystemExit(f"need >= 2 GPUs (or --device cpu), have {gpus}")
    m = args.trainers or (gpus if args.colocate else max(1, gpus // 2))
    n = gpus if args.colocate else gpus - m
    tp = args.tp or n
    if n < 1 or n % tp:
        raise SystemExit(f"{n} receivers cannot hold whole engines of tp {tp}")
    models = ["small"] if args.small else args.models.split(",")
    methods = args.methods.split(",")
    base = {"device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo", "m": m, "n": n, "tp": tp,
            "iters": args.iters, "bucket_mb": args.bucket_mb if not args.small else 0.05, "dtype": args.dtype,
            "fsdp": not args.no_fsdp, "timeout": args.timeout, "colocate": args.colocate}
    out = {"benchmark": "multi_gpu_push", "device": args.device, "gpus": gpus, "trainer_ranks": m, "receivers": n,
           "tp": tp, "fsdp": base["fsdp"], "colocate": args.colocate, "iters": args.iters,
           "gpu_name": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None,
           "models": {}}
    for model in models:
        cfg = dict(base, shape=model)
        entry = {"plan": dry_plan(cfg)}
        if not args.dry_run:
            for method in methods:
                if method == "ce":
                    why = "needs CUDA" if args.device != "cuda" else have_checkpoint_engine()
                    if why:
                        entry["ce"] = {"skipped": why}
                        continue
                entry[method] = run_method(method, cfg)
            if "ce" in entry and "push_s" in entry["ce"]:
                if "push_s" in entry.get("plain", {}):
                    entry["plain"]["speedup_vs_checkpoint_engine"] = round(
                        entry["ce"]["push_s"] / entry["plain"]["push_s"], 2)
        out["models"][model] = entry
        print(json.dumps({model: entry}), file=sys.stderr, flush=True)
    emit(out)
    return out


if __name__ == "__main__":
    main()
