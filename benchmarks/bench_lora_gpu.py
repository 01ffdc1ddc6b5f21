"""LoRA pushes into a REAL vLLM engine on one GPU (issue 27): adapter mode, merged mode and a full push, one run.

    source /tmp/gpu-stash/activate.sh && python -m benchmarks.bench_lora_gpu > bench.json   # one GPU, vLLM 0.26

The trainer is this process: a Qwen3-8B-shaped bf16 model (random weights, on cuda:0) wrapped by PEFT with a rank-16
LoRA adapter on all seven linear kinds (q/k/v/o/gate/up/down, B non-zero). The engines (vLLM's multiprocess engine
core: another process on the same GPU, so pushes go by CUDA IPC, as a colocated trainer's do) serve the same
architecture from a config with dummy weights, eager mode. Each number is the median of ``--reps`` steady-state
``WeightSync.push()`` calls (pause -> start -> receive and apply -> finish -> prefix-cache reset -> resume, all
included), with the bytes on the wire per push:

* ``adapter``: an engine started with ``enable_lora=True, max_lora_rank=16``; every push carries A and B only and
  the engine installs them in memory as the new version of its one adapter (goal: under 10 ms);
* ``merged``: an engine without LoRA; after the first push (the whole model) each push carries the adapted modules
  merged (base + scaling * B @ A, computed on the trainer's GPU), never the embedding, LM head or norms;
* ``full``: the same engine, every push the whole merged model (the base made "not sent" again before each push):
  what pushing a LoRA policy costs without trainer_sync's LoRA modes.

Prints one JSON object (the last line of stdout); progress goes to stderr. ``--small`` runs a tiny shape (a check
that the script works, not a measurement).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from benchmarks.common import emit, parser
from benchmarks.bench_vllm_gpu import config_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build_policy(path: str, rank: int):
    """The trainer's PeftModel: the config at ``path`` with random bf16 weights on the GPU, a LoRA adapter on every
    linear kind with random A and B (PEFT's default B = 0 would make every merged module equal the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             init_lora_weights=False))
    return model.eval()


@torch.no_grad()
def step(model, seed: int) -> None:
    """A stand-in for an optimizer step on the adapter (only A and B change, as in LoRA training)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.add_(torch.randn(p.shape, generator=gen, device="cuda", dtype=p.dtype) * 1e-3)


def engine(path: str, lora: bool, rank: int, mem: float):
    from vllm import LLM

    extra = dict(enable_lora=True, max_lora_rank=rank, max_loras=1) if lora else {}
    return LLM(model=path, weight_transfer_config={"backend": "trainer_sync"}, load_format="dummy",
               enforce_eager=True, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024, max_num_seqs=8,
               gpu_memory_utilization=mem, seed=0, **extra)


def pushes(sync, model, reps: int, before=None) -> list[dict]:
    out = []
    for i in range(reps):
        step(model, 100 + i)
        if before is not None:
            before()
        torch.cuda.synchronize()
        r = sync.push()
        out.append({"total_s": r.total_s, "bytes": r.bytes, "apply_s": r.apply_s, "lora": r.lora,
                    "engine_apply": r.engine_apply})
    return out


def summary(rows: list[dict]) -> dict:
    return {"median_s": statistics.median(r["total_s"] for r in rows), "min_s": min(r["total_s"] for r in rows),
            "bytes": rows[-1]["bytes"], "lora": rows[-1]["lora"], "engine_apply": rows[-1]["engine_apply"],
            "apply_median_s": statistics.median(r["apply_s"] for r in rows), "all_s": [r["total_s"] for r in rows]}


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mem", type=float, default=0.45, help="gpu_memory_utilization of each engine (one at a time)")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    from trainer_sync import SyncConfig, WeightSync

    path = config_dir(args.small)
    t0 = time.perf_counter()
    model = build_policy(path, args.rank)
    adapter_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if "lora_" in n)  # bf16 on the wire
    log(f"policy built in {time.perf_counter() - t0:.1f} s; adapter {adapter_bytes / 1e6:.1f} MB (bf16)")
    result = {"bench": "lora_gpu", "shape": "small" if args.small else "qwen3-8b", "rank": args.rank,
              "targets": TARGETS, "adapter_bytes_bf16": adapter_bytes, "device": torch.cuda.get_device_name()}
    import vllm

    result["vllm"] = vllm.__version__

    llm = engine(path, True, args.rank, args.mem)
    try:
        with WeightSync(model, [llm], SyncConfig(lora="adapter")) as sync:
            first = pushes(sync, model, 1)  # the first push: nothing to warm up beyond the group
            result["adapter"] = {**summary(pushes(sync, model, args.reps)), "first_s": first[0]["total_s"]}
        log("adapter", result["adapter"]["median_s"], result["adapter"]["bytes"])
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        torch.cuda.empty_cache()

    llm = engine(path, False, args.rank, args.mem)
    try:
        with WeightSync(model, [llm], SyncConfig(lora="merged")) as sync:
            first = pushes(sync, model, 2)  # the base on the first push; the second proves the fast path
            result["merged"] = {**summary(pushes(sync, model, args.reps)), "first_s": first[0]["total_s"],
                                "first_bytes": first[0]["bytes"]}
            # A full push every time: forget that the engines hold the base (the first push's rule), then push.
            result["full"] = summary(pushes(sync, model, args.reps, before=sync.sender.lora.connected))
        log("merged", result["merged"]["median_s"], "full", result["full"]["median_s"])
    finally:
        llm.llm_engine.engine_core.shutdown()
    result["merged_fraction_of_full_bytes"] = result["merged"]["bytes"] / result["full"]["bytes"]
    result["merged_fraction_of_full_time"] = result["merged"]["median_s"] / result["full"]["median_s"]
    emit(result)
    return result


if __name__ == "__main__":
    main()
