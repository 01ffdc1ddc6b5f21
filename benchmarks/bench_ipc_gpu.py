"""Colocated weight sync on one GPU: trainer_sync's CUDA IPC push against checkpoint-engine 0.4.2 and the floor.

    python -m benchmarks.bench_ipc_gpu > bench.json               # one H200: Qwen3-8B shapes, 399 tensors, 16.38 GB
    python -m benchmarks.bench_ipc_gpu --small --device cpu       # the orchestration on a tiny model, no GPU (the
                                                                  # CUDA calls replaced by the tests' host stand-in)

Two processes on the GPU: a trainer holding the bf16 weights (its ``nn.Module``) and a receiver holding tensors of
the same shapes that applies every update by name (``own[name].copy_(tensor)``), as the vLLM backend's load does.
Measured in one run, each the median of several steady-state repetitions after warm-up:

* ``ipc_direct``: ``Sender.push()`` with ``mode="ipc"`` (default ``ipc_direct``): the receiver copies straight out
  of the trainer's parameters. The time is the trainer's ``push()`` wall time (handshake, transfer, the receiver's
  apply, its device sync, the acknowledgement).
* ``ipc_staged``: the same with ``ipc_direct`` off: packed on the device into two exported 1.24 GB bucket buffers
  (the embedding has a bucket of its own), then applied from there.
* ``floor``: one flat device-to-device copy of the same number of bytes (CUDA events), and, for reference, the
  same bytes as 399 per-tensor copies.
* checkpoint-engine 0.4.2 colocated: its ``ParameterServer`` (world size 1, ``use_shared_memory_pool=True``) and a
  receiver running ``checkpoint_engine.worker.update_weights_from_ipc`` with the same apply function. Timed per RL
  step: D2H of the weights into pinned host tensors (allocated once), ``register_checkpoint``, ``gather_metas``,
  ``update()``; reported as ``update()`` alone and as the whole step.

Prints one JSON object (the last line of stdout); progress goes to stderr.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch

from benchmarks.common import emit, parser, stats, sync, timed
from benchmarks.shapes import qwen3_shapes

GB = 1e9


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def shapes_for(small: bool, layers: int = 36):
    if small:
        return qwen3_shapes(layers=layers, hidden=64, inter=192, vocab=512, q_heads=2, kv_heads=1, head_dim=32)
    return qwen3_shapes()


def build_module(shapes, device, seed) -> torch.nn.Module:
    root = torch.nn.Module()
    g = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes:
        mod = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        t.normal_(generator=g)
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def checksum(tensors) -> list[int]:
    """One number per tensor from its bits (on the device; equal bits -> equal numbers)."""
    out = []
    for t in tensors:
        h = t.detach().reshape(-1).view(torch.int16).to(torch.int32)
        out.append(int((h * (h + 7)).sum(dtype=torch.int64)))
    return out


class Ctl:
    """A side TCPStore for the two processes' phases (the trainer hosts it)."""

    def __init__(self, port: int, role: str):
        self.role = role
        self.store = torch.distributed.TCPStore("127.0.0.1", port, is_master=role == "trainer",
                                                timeout=timedelta(seconds=900), wait_for_workers=False)

    def meet(self, name: str) -> None:
        self.store.set(f"meet/{name}/{self.role}", "1")
        self.store.wait([f"meet/{name}/trainer", f"meet/{name}/receiver"])

    def put(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str):
        self.store.wait([key])
        return json.loads(self.store.get(key))




def save_partial(args, res) -> None:
    """What is measured so far, in case a later phase hangs and the run is cut off."""
    if args.get("partial"):
        with open(args["partial"], "w") as f:
            json.dump(res, f)



# ---- trainer process ------------------------------------------------------------------------------------------

def trainer(rank, world, args) -> dict:
    device = torch.device(args["device"])
    if device.type == "cpu":
        from tests.helpers import ipc_roles

        ipc_roles.use_standin()
    from trainer_sync import Sender, SyncConfig

    shapes = shapes_for(args["small"], args["layers"])
    ctl = Ctl(args["ctl_port"], "trainer")
    model = build_module(shapes, device, seed=1)
    if device.type == "cpu":
        model.share_memory()
    params = [p for _, p in model.named_parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    res = {"tensors": len(params), "bytes": total, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "torch": torch.__version__}
    log(f"trainer: {len(params)} tensors, {total / GB:.2f} GB on {res['device']}")
    reps, warm = args["reps"], args["warmup"]

    # -- trainer_sync over CUDA IPC ----------------------------------------------------------------------------
    sender = Sender(model, SyncConfig(mode="ipc", port=args["port"], token="bench", timeout_s=60))
    ctl.meet("model-ready")
    sender.connect(1)
    for path in ("direct", "staged"):
        try:
            sender.transport.allow_direct = path == "direct"  # an IpcSend (mode="ipc")
            walls, reports = [], []
            for k in range(warm + reps):
                if k == warm + reps - 1:  # new weights before the last push: the check below sees them arrive
                    with torch.no_grad():
                        for p in params:
                            p.mul_(-1)
                    sync(device)
                t = time.perf_counter()
                rep = sender.push()
                walls.append(time.perf_counter() - t)
                reports.append(rep.to_dict())
                log(f"trainer_sync ipc {path} push {k}: {rep}")
            want = checksum(params)
            got = ctl.get(f"sum/{path}")
            res[f"ipc_{path}"] = {**stats(walls[warm:]), "first_push_s": round(walls[0], 4),
                                  "bit_exact_checksums": want == got,
                                  "last_report": reports[-1], "buckets": reports[-1]["num_buckets"]}
        except Exception as e:  # noqa: BLE001 - report and go on to the other measurements
            res[f"ipc_{path}"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            log(res[f"ipc_{path}"]["trace"])
            break
        save_partial(args, res)
    ctl.meet("ipc-done")  # the receiver closes first (it unmaps), then the trainer releases its exports
    sender.close()
    ctl.meet("ipc-closed")

    # -- the floor: one flat D2D copy of the same bytes -----------------------------------------------------------
    try:
        src = torch.empty(total, dtype=torch.uint8, device=device)
        dst = torch.empty(total, dtype=torch.uint8, device=device)
        src.random_(0, 255)
        floor = timed(lambda: dst.copy_(src), device, reps=5, warmup=2)
        views, off = [], 0
        for p in params:
            n = p.numel() * p.element_size()
            views.append(dst[off:off + n].view(torch.bfloat16).view(p.shape))
            off += n

        def per_tensor():
            for v, p in zip(views, params):
                v.copy_(p)

        per = timed(per_tensor, device, reps=5, warmup=2)
        res["floor_flat_d2d"] = {**stats(floor), "gbps": round(total / statistics.median(floor) / GB, 1)}
        res["per_tensor_d2d"] = stats(per)
        src = dst = views = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        res["floor_flat_d2d"] = {"error": f"{type(e).__name__}: {e}"}
    log(f"floor: {res.get('floor_flat_d2d')}")
    save_partial(args, res)
    ctl.meet("floor-done")

    # -- checkpoint-engine 0.4.2, colocated ---------------------------------------------------------------------
    res["checkpoint_engine"] = checkpoint_engine_trainer(model, params, device, ctl, args)
    ctl.meet("all-done")
    return res


def checkpoint_engine_trainer(model, params, device, ctl, args) -> dict:
    if device.type != "cuda":
        ctl.put("ce/skip", True)
        return {"skipped": "checkpoint-engine needs CUDA"}
    try:
        import checkpoint_engine
        from checkpoint_engine.ps import ParameterServer
    except Exception as e:  # noqa: BLE001
        ctl.put("ce/skip", True)
        return {"error": f"cannot import checkpoint_engine: {type(e).__name__}: {e}"}
    ctl.put("ce/skip", False)
    out = {"version": getattr(checkpoint_engine, "__version__", "?")}
    try:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", LOCAL_RANK="0")
        import checkpoint_engine.ps as ce_ps

        try:  # it asks the OS for a route to 8.8.8.8, then for its hostname's address; neither may exist here
            ce_ps.get_ip()
        except Exception:  # noqa: BLE001
            ce_ps.get_ip = lambda: "127.0.0.1"
            out["note"] = "get_ip() failed on this machine: patched to 127.0.0.1"
        ps = ParameterServer(rank=0, world_size=1, auto_pg=True, master_addr="127.0.0.1",
                             master_port=args["ce_port"])
        named = dict(model.named_parameters())
        t = time.perf_counter()
        host = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in named.items()}
        out["pinned_alloc_s"] = round(time.perf_counter() - t, 3)
        steps = []
        for k in range(args["ce_steps"]):
            name = f"step{k}"

            def req_func(socket_paths, k=k):
                ctl.put(f"ce/{k}/go", socket_paths)
                ok = ctl.get(f"ce/{k}/done")
                if ok != "ok":
                    raise RuntimeError(f"receiver: {ok}")

            if k == args["ce_steps"] - 1:
                with torch.no_grad():
                    for p in params:
                        p.mul_(-1)
            sync(device)
            t0 = time.perf_counter()
            for n, p in named.items():
                host[n].copy_(p.detach(), non_blocking=True)
            torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            ps.register_checkpoint(name, named_tensors=host, use_shared_memory_pool=True)
            t2 = time.perf_counter()
            ps.gather_metas(name)
            t3 = time.perf_counter()
            ps.update(name, req_func)
            t4 = time.perf_counter()
            ps.unregister_checkpoint(name)  # the shared pool stays for the next step
            step = {"d2h_s": t1 - t0, "register_s": t2 - t1, "gather_metas_s": t3 - t2, "update_s": t4 - t3,
                    "rl_step_s": t4 - t0}
            steps.append(step)
            log(f"checkpoint-engine step {k}: " + ", ".join(f"{a} {b:.3f}" for a, b in step.items()))
        timed_steps = steps[1:] if len(steps) > 1 else steps  # the first registers (allocates) the pinned pool
        for key in ("d2h_s", "register_s", "gather_metas_s", "update_s", "rl_step_s"):
            out[key] = stats([s[key] for s in timed_steps])
        out["first_step"] = {a: round(b, 3) for a, b in steps[0].items()}
        out["bit_exact_checksums"] = checksum(params) == ctl.get("sum/ce")
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        out["trace"] = traceback.format_exc()[-3000:]
        log(out["trace"])
        ctl.put("ce/abort", True)
    return out


# ---- receiver process -----------------------------------------------------------------------------------------

def receiver(rank, world, args) -> dict:
    device = torch.device(args["device"])
    if device.type == "cpu":
        from tests.helpers import ipc_roles

        ipc_roles.use_standin()
    from trainer_sync import Receiver
    from trainer_sync.protocol.messages import JoinInfo

    shapes = shapes_for(args["small"], args["layers"])
    ctl = Ctl(args["ctl_port"], "receiver")
    own = {}
    for name, shape in shapes:
        own[name] = torch.zeros(shape, dtype=torch.bfloat16, device=device)

    def apply(batch):  # what the vLLM backend's load does for a plain weight: copy into the engine's tensor by name
        for name, t in batch:
            own[name].copy_(t)

    res = {}
    ctl.meet("model-ready")
    r = Receiver(JoinInfo("127.0.0.1", args["port"], "bench", 0, 1, 1, 0, "gloo", 60.0),
                 expected={n: (list(s), "bfloat16") for n, s in shapes},
                 device=device if device.type == "cuda" else None)
    r.connect()
    reps, warm = args["reps"], args["warmup"]
    for path in ("direct", "staged"):
        try:
            times = []
            for _ in range(warm + reps):
                out = r.receive(apply)
                times.append((out.transfer_s, out.apply_s))
            ctl.put(f"sum/{path}", checksum(own[n] for n, _ in shapes))
            res[f"ipc_{path}"] = {"transfer_s": stats([a for a, _ in times[warm:]]),
                                  "apply_s": stats([b for _, b in times[warm:]])}
        except Exception as e:  # noqa: BLE001
            res[f"ipc_{path}"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            log(res[f"ipc_{path}"]["trace"])
            break
    r.close()
    ctl.meet("ipc-done")
    ctl.meet("ipc-closed")
    ctl.meet("floor-done")

    if not ctl.get("ce/skip"):
        try:
            import zmq
            from checkpoint_engine.worker import update_weights_from_ipc

            zctx = zmq.Context()
            uuid = "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
            for k in range(args["ce_steps"]):
                paths = dict(ctl.get(f"ce/{k}/go"))
                try:
                    update_weights_from_ipc(zctx, paths.get(uuid) or next(iter(paths.values())),
                                            device_id=device.index or 0, run=apply)
                    ctl.put(f"ce/{k}/done", "ok")
                except Exception as e:
                    ctl.put(f"ce/{k}/done", f"{type(e).__name__}: {e}")
                    raise
            ctl.put("sum/ce", checksum(own[n] for n, _ in shapes))
        except Exception as e:  # noqa: BLE001
            res["checkpoint_engine"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            log(res["checkpoint_engine"]["trace"])
    ctl.meet("all-done")
    return res


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--small", action="store_true", help="a tiny Qwen3-shaped model (logic check)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the --small model (36: all 399 tensors)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ce-steps", type=int, default=4, help="checkpoint-engine RL steps (the first is warm-up)")
    ap.add_argument("--partial", help="also write the trainer's results to this file after each phase")
    a = ap.parse_args()
    from trainer_sync.testing.local_cluster import free_port, run_roles

    args = {"device": a.device, "small": a.small, "layers": a.layers, "reps": a.reps, "warmup": a.warmup,
            "ce_steps": a.ce_steps, "partial": a.partial, "port": free_port(), "ctl_port": free_port(),
            "ce_port": free_port()}
    t = time.perf_counter()
    out = run_roles([("trainer", 0, 1, trainer, (args,)), ("receiver", 0, 1, receiver, (args,))], timeout=1500)
    tr, rc = out[("trainer", 0)], out[("receiver", 0)]
    res = {"benchmark": "colocated_ipc_one_gpu", "date": time.strftime("%Y-%m-%d"), **tr}
    for key in ("ipc_direct", "ipc_staged"):
        if key in rc and key in res:
            res[key]["receiver"] = rc[key]
    if "checkpoint_engine" in rc:
        res["checkpoint_engine"]["receiver"] = rc["checkpoint_engine"]
    floor = res.get("floor_flat_d2d", {}).get("median_s")
    direct = res.get("ipc_direct", {}).get("median_s")
    staged = res.get("ipc_staged", {}).get("median_s")
    ce = res.get("checkpoint_engine", {})
    summary = {}
    if floor and direct:
        summary["ipc_direct_vs_floor"] = round(direct / floor, 2)
        summary["goal_within_3.3x_floor"] = direct <= 3.3 * floor
    if floor and staged:
        summary["ipc_staged_vs_floor"] = round(staged / floor, 2)
    if direct and "update_s" in ce:
        summary["ce_update_over_ipc_direct"] = round(ce["update_s"]["median_s"] / direct, 1)
        summary["ce_rl_step_over_ipc_direct"] = round(ce["rl_step_s"]["median_s"] / direct, 1)
        summary["goal_40x_faster_than_ce_update"] = ce["update_s"]["median_s"] >= 40 * direct
    res["summary"] = summary
    res["wall_s"] = round(time.perf_counter() - t, 1)
    emit(res)


if __name__ == "__main__":
    main()
