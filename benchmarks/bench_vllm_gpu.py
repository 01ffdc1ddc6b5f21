"""A push into a REAL vLLM engine on one GPU: trainer_sync against vLLM's own ``ipc`` backend and the copy floor.

    source /tmp/gpu-stash/activate.sh && python -m benchmarks.bench_vllm_gpu > bench.json   # one H200, vLLM 0.26

One GPU, two processes: this script is the trainer (a Qwen3-8B-shaped bf16 model, 399 tensors, 16.38 GB, on
cuda:0) and it starts ``vllm.LLM`` engines with vLLM's multiprocess engine core, so the engine's worker is another
process on the same GPU (the colocated RL layout; mode "auto" picks CUDA IPC). The engines serve the same
architecture from a config with dummy weights (``load_format="dummy"``) and eager mode: weight sync does not
depend on how the forward pass is compiled. Measured in one run, each the median of ``--reps`` steady-state pushes:

* ``trainer_sync``: ``WeightSync.push()`` wall time on the trainer, everything included (pause -> start -> the
  receive and apply -> finish with the version -> prefix-cache reset -> resume), with the engine applying by its
  fast path (copies straight into place, proven on the first push), plus each engine call's own time.
* ``trainer_sync_layerwise``: the same with ``SyncConfig(engine_apply="layerwise")`` (vLLM's layerwise reload).
* ``vllm_ipc``: vLLM's own ``ipc`` backend into the same engine configuration, driven the way its docs show
  (``start_weight_update`` -> ``IPCWeightTransferEngine.trainer_send_weights`` -> ``finish_weight_update``),
  without and with pause / prefix-cache reset / resume around it.
* ``checkpoint_engine``: MoonshotAI's checkpoint-engine 0.4.2 into the same engine configuration through its own
  vLLM worker extension (``VllmColocateWorkerExtension.update_weights_from_ipc``, which ends with vLLM's
  ``process_weights_after_loading``), if ``checkpoint_engine`` imports: ``update_s`` is ``ParameterServer.update``
  with the checkpoint already registered in pinned host memory (its H2D buckets, IPC and the engine's
  ``load_weights``); ``rl_step_s`` adds what an RL step also needs, the D2H of the trainer's new weights into a
  registered checkpoint (register, gather metas, update, unregister).
* ``floor``: one flat device-to-device copy of the same bytes (CUDA events).

Prints one JSON object (the last line of stdout); progress goes to stderr.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from benchmarks.bench_ipc_gpu import build_module, log, shapes_for, stats, timed
from benchmarks.shapes import qwen3_moe_shapes
from trainer_sync import SyncConfig, WeightSync
from trainer_sync.engines.clients import LlmClient
from benchmarks.common import emit, parser

BACKEND = {"backend": "trainer_sync"}


def moe_config_dir(layers: int, small: bool = False) -> str:
    """A Qwen3-MoE config matching ``qwen3_moe_shapes`` (Qwen3-30B-A3B's widths, top-8; dummy weights)."""
    from transformers import Qwen3MoeConfig

    dims = dict(hidden_size=256, num_experts=8, moe_intermediate_size=128, vocab_size=512, num_attention_heads=2,
                num_key_value_heads=1, head_dim=128, num_experts_per_tok=2) if small else \
        dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, vocab_size=151936, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_experts_per_tok=8)
    cfg = Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=layers, tie_word_embeddings=False,
                         max_position_embeddings=4096, dtype="bfloat16", decoder_sparse_step=1, mlp_only_layers=[],
                         norm_topk_prob=True, intermediate_size=6144, **dims)
    path = tempfile.mkdtemp(prefix="qwen3-moe-shape-")
    cfg.save_pretrained(path)
    return path


def moe_shapes(layers: int, small: bool = False):
    if small:
        return qwen3_moe_shapes(layers=layers, hidden=256, experts=8, width=128, vocab=512, q_heads=2, kv_heads=1)
    return qwen3_moe_shapes(layers=layers)


def checkpoint_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors under the checkpoint's names: a fused expert parameter as its per-expert views (no copy;
    what a user of vLLM's own ipc backend hands it, since vLLM loads per-expert names)."""
    from trainer_sync.sources.experts import expert_views

    named = dict(model.named_parameters())
    views = expert_views({n: tuple(p.shape) for n, p in named.items()}, None)
    out = []
    for n, p in named.items():
        if n not in views:
            out.append((n, p))
            continue
        flat = p.detach().view(-1)
        out += [(v.name, flat[v.offset:v.offset + v.numel].view(v.shape)) for v in views[n]]
    return out


def config_dir(small: bool) -> str:
    """A Qwen3 config matching ``shapes_for(small)`` (vLLM serves it with dummy weights)."""
    from transformers import Qwen3Config

    dims = dict(hidden_size=64, intermediate_size=192, vocab_size=512, num_attention_heads=2, num_key_value_heads=1,
                head_dim=32) if small else \
        dict(hidden_size=4096, intermediate_size=12288, vocab_size=151936, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128)
    cfg = Qwen3Config(architectures=["Qwen3ForCausalLM"], num_hidden_layers=36, tie_word_embeddings=False,
                      max_position_embeddings=4096, dtype="bfloat16", **dims)
    path = tempfile.mkdtemp(prefix="qwen3-shape-")
    cfg.save_pretrained(path)
    return path


def start_engine(path: str, backend: dict | None, mem: float, **extra):
    from vllm import LLM

    return LLM(model=path, load_format="dummy", enforce_eager=True, dtype="bfloat16", skip_tokenizer_init=True,
               max_model_len=1024, max_num_seqs=8, gpu_memory_utilization=mem, weight_transfer_config=backend,
               seed=0, **extra)


class TimedClient(LlmClient):
    """LlmClient that records how long each engine call takes (the control path's share of a push)."""

    CALLS = ("pause", "start", "update", "finish", "reset_prefix_cache", "resume")

    def __init__(self, llm):
        super().__init__(llm)
        self.times: dict[str, list[float]] = {c: [] for c in self.CALLS}
        for c in self.CALLS:
            setattr(self, c, self._timed(c, getattr(self, c)))

    def _timed(self, name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.times[name].append(time.perf_counter() - t)
        return run


def bench_trainer_sync(llm, model, reps: int, apply: str) -> dict:
    client = TimedClient(llm)
    out = {}
    with WeightSync(model, [client], SyncConfig(engine_apply=apply)) as sync:
        reports = []
        for i in range(3 + reps):
            with torch.no_grad():  # a new version each time (the bytes must really move)
                model.get_parameter("model.norm.weight").add_(1.0)
            reports.append(sync.push())
        steady = reports[3:]
        out["push"] = stats([r.total_s for r in steady])
        out["apply"] = stats([r.apply_s for r in steady])
        out["engine_apply"] = [r.engine_apply for r in reports]
        out["calls_median_s"] = {c: round(statistics.median(v[3:]), 6) for c, v in client.times.items() if v[3:]}
        out["first_push_s"] = round(reports[0].total_s, 4)
        out["report"] = steady[-1].to_dict()
    return out


def bench_vllm_ipc(llm, model, reps: int) -> dict:
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm.init_weight_transfer_engine({"init_info": {}})
    send = {"send_mode": lambda info: llm.update_weights({"update_info": asdict(info)})}
    tensors = checkpoint_tensors(model)

    def push(pause: bool) -> float:
        t = time.perf_counter()
        if pause:
            llm.sleep(level=0, mode="keep")
        llm.start_weight_update()
        IPCWeightTransferEngine.trainer_send_weights(iter(tensors), send)
        llm.finish_weight_update()
        if pause:
            llm.reset_prefix_cache(reset_running_requests=True)
            llm.wake_up(tags=["scheduling"])
        return time.perf_counter() - t

    out = {}
    for pause in (False, True):
        xs = [push(pause) for _ in range(2 + reps)][2:]
        out["with_pause" if pause else "no_pause"] = stats(xs)
    return out


def bench_checkpoint_engine(path: str, model, reps: int) -> dict:
    """checkpoint-engine 0.4.2 (one ParameterServer rank, colocated with the engine on this GPU)."""
    import socket

    from checkpoint_engine.ps import ParameterServer

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # ParameterServer reads RANK / WORLD_SIZE from the environment when given rank 0 (``rank or env``), and its
    # TCPStore listens on MASTER_PORT; it destroys its process group after each update (auto_pg).
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    llm = start_engine(path, None, 0.35, worker_extension_cls="checkpoint_engine.worker.VllmColocateWorkerExtension")
    try:
        ps = ParameterServer(rank=0, world_size=1, gpu_count=1)

        def req(socket_paths):
            llm.collective_rpc("update_weights_from_ipc", args=(dict(socket_paths),))

        def register() -> None:  # the RL step's D2H: the trainer's current weights into pinned host memory
            named = {n: p.detach().to("cpu") for n, p in model.named_parameters()}
            ps.register_checkpoint("bench", named_tensors=named, use_shared_memory_pool=True)
            ps.gather_metas("bench")

        register()
        update = []
        for _ in range(2 + reps):
            t = time.perf_counter()
            ps.update("bench", req)
            update.append(time.perf_counter() - t)
        ps.unregister_checkpoint("bench")
        step = []
        for _ in range(2 + max(3, reps // 3)):
            with torch.no_grad():
                model.get_parameter("model.norm.weight").add_(1.0)
            t = time.perf_counter()
            register()
            ps.update("bench", req)
            ps.unregister_checkpoint("bench")
            step.append(time.perf_counter() - t)
        return {"update": stats(update[2:]), "rl_step": stats(step[2:])}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (the control path alone)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B's widths (fused experts) instead of Qwen3-8B")
    ap.add_argument("--layers", type=int, default=24, help="with --moe: layers (48 in Qwen3-30B-A3B; 24 fit the "
                    "trainer's copy and the engine on one 80 GB GPU)")
    ap.add_argument("--mem", type=float, default=None, help="the engine's gpu_memory_utilization "
                    "(default 0.35, 0.55 with --moe)")
    ap.add_argument("--skip-vllm-ipc", action="store_true")
    ap.add_argument("--skip-checkpoint-engine", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    shapes = moe_shapes(args.layers, args.small) if args.moe else shapes_for(args.small)
    path = moe_config_dir(args.layers, args.small) if args.moe else config_dir(args.small)
    mem = args.mem or (0.55 if args.moe else 0.35)
    model = build_module(shapes, dev, seed=0)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = f"qwen3-moe-30b-a3b-shaped-{args.layers}-layers" if args.moe else "qwen3-8b-shaped"
    res = {"machine": torch.cuda.get_device_name(0), "model": name + ("-small" if args.small else ""),
           "tensors": len(shapes), "bytes": nbytes}
    import vllm

    res["vllm"] = vllm.__version__
    log(f"{len(shapes)} tensors, {nbytes / 1e9:.2f} GB; starting the trainer_sync engine")
    llm = start_engine(path, BACKEND, mem)
    try:
        res["trainer_sync"] = bench_trainer_sync(llm, model, args.reps, "auto")
        log("trainer_sync:", res["trainer_sync"]["push"]["median_s"], res["trainer_sync"]["calls_median_s"])
        res["trainer_sync_layerwise"] = bench_trainer_sync(llm, model, max(3, args.reps // 3), "layerwise")
        log("layerwise:", res["trainer_sync_layerwise"]["push"]["median_s"])
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        torch.cuda.empty_cache()
    emit(res)
    if not args.skip_vllm_ipc:
        log("starting vLLM's own ipc backend")
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # its update info carries pickled CUDA IPC handles
        try:
            llm = start_engine(path, {"backend": "ipc"}, mem)
            try:
                res["vllm_ipc"] = bench_vllm_ipc(llm, model, args.reps)
            finally:
                llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - reported in the JSON; the other figures stand
            res["vllm_ipc"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log("vllm ipc:", res["vllm_ipc"])
    if not args.skip_checkpoint_engine and not args.moe:  # its worker extension loads the dense layout only
        log("starting checkpoint-engine into vLLM")
        try:
            res["checkpoint_engine"] = bench_checkpoint_engine(path, model, args.reps)
        except Exception:  # noqa: BLE001 - reported in the JSON; the other figures stand
            import traceback

            res["checkpoint_engine"] = {"error": traceback.format_exc()[-3000:]}
        log("checkpoint-engine:", res["checkpoint_engine"])
        torch.cuda.empty_cache()
    flat = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(flat)
    res["floor_d2d"] = stats(timed(lambda: dst.copy_(flat), dev, 10, 3))
    ts = res["trainer_sync"]["push"]["median_s"]
    res["ratios"] = {"trainer_sync_over_floor": round(ts / res["floor_d2d"]["median_s"], 2)}
    if "with_pause" in res.get("vllm_ipc", {}):
        res["ratios"]["vllm_ipc_with_pause_over_trainer_sync"] = round(
            res["vllm_ipc"]["with_pause"]["median_s"] / ts, 2)
        res["ratios"]["vllm_ipc_no_pause_over_trainer_sync"] = round(res["vllm_ipc"]["no_pause"]["median_s"] / ts, 2)
    if "update" in res.get("checkpoint_engine", {}):
        ce = res["checkpoint_engine"]
        res["ratios"]["checkpoint_engine_update_over_trainer_sync"] = round(ce["update"]["median_s"] / ts, 2)
        res["ratios"]["checkpoint_engine_rl_step_over_trainer_sync"] = round(ce["rl_step"]["median_s"] / ts, 2)
    emit(res)


if __name__ == "__main__":
    main()
