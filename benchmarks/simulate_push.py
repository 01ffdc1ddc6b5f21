"""Print the push-time simulator's estimates as JSON (benchmarks/simulate.py holds the model and its assumptions).

    python -m benchmarks.simulate_push                      # the report: 1T on 256 GPUs + the x2/x4/x8 bench configs
    python -m benchmarks.simulate_push --model qwen3_8b --gpus 4 --tp 4 --trainer-gpus 4
    python -m benchmarks.simulate_push --model-bytes 1e12 --gpus 256 --tp 16 --stream-cap 50 --per-tensor-us 20

Runs anywhere (pure Python, no GPU).
"""
from __future__ import annotations



from benchmarks.common import emit, parser
from benchmarks.simulate import (KIMI_K2_FP8, QWEN3_8B, QWEN3_32B, CeRates, Hardware, SyncRates, Workload,
                                 compare, simulate_checkpoint_engine, simulate_trainer_sync)

MODELS = {"qwen3_8b": QWEN3_8B, "qwen3_32b": QWEN3_32B, "kimi_k2_fp8": KIMI_K2_FP8}

SOURCES = {
    "measured_h200": "D2D 16.38 GB in 7.6 ms (2155 GB/s); pinned H2D 16.38 GB in 0.297 s (55 GB/s); checkpoint-engine "
                     "0.4.2 colocated update() 1.00 s for 16.38 GB (+0.30 s D2H, 0.71 s register per step)",
    "vendor": "NVLink 4 (H100/H200): 450 GB/s per GPU per direction; 8 x 400 Gb/s IB per node = 50 GB/s per GPU",
    "published_checkpoint_engine": "Kimi-K2-Instruct FP8, 256 x H20, TP16: 21.50 s broadcast (README of 0.1.x; "
                                   "about 16-21 s across its versions)",
}


def headline() -> dict:
    """1T FP8 on 256 GPUs (TP16, colocated as in checkpoint-engine's runs) under the two broadcast assumptions, with
    a per-tensor apply cost sensitivity; then the configurations bench_multi_gpu.py would measure."""
    w = Workload(num_gpus=256, tp=16, **KIMI_K2_FP8)
    out = {"sources": SOURCES, "one_trillion_on_256": {}}
    for label, hw in (("stream_at_one_nic_50GBps", Hardware(stream_cap_GBps=50.0)),
                      ("stream_at_node_aggregate_400GBps", Hardware())):
        out["one_trillion_on_256"][label] = compare(w, hw)
    sens = {}
    for us in (0, 5, 20):
        hw = Hardware(stream_cap_GBps=50.0)
        sens[f"{us}us_per_tensor"] = {
            "trainer_sync_s": round(simulate_trainer_sync(w, hw, SyncRates(per_tensor_s=us * 1e-6)).seconds, 3),
            "checkpoint_engine_s": round(simulate_checkpoint_engine(w, hw, CeRates(per_tensor_s=us * 1e-6)).seconds,
                                         3)}
    out["one_trillion_on_256"]["per_tensor_apply_sensitivity"] = sens
    # trainer ranks on separate GPUs (disaggregated): 64 trainer GPUs feeding 256 inference GPUs
    out["one_trillion_256_inference_64_trainer_gpus"] = compare(
        Workload(num_gpus=256, tp=16, trainer_gpus=64, **KIMI_K2_FP8), Hardware(stream_cap_GBps=50.0))
    bench = {}
    for gpus in (2, 4, 8):
        m = gpus // 2
        n = gpus - m
        for name in ("qwen3_8b", "qwen3_32b"):
            w = Workload(num_gpus=n, tp=n, trainer_gpus=m, **MODELS[name])
            r = compare(w, Hardware())
            bench[f"x{gpus}_{name}_{m}trainer_{n}receiver_tp{n}"] = {
                k: {"seconds": v["seconds"], "receive_GBps": v["receive_GBps"], "bottleneck": v["bottleneck"]}
                for k, v in r.items() if isinstance(v, dict)} | {"speedup": r["speedup_vs_checkpoint_engine"]}
    out["bench_multi_gpu_configs"] = bench
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", choices=sorted(MODELS))
    ap.add_argument("--model-bytes", type=float, help="instead of --model: total bytes on the wire")
    ap.add_argument("--gpus", type=int, default=8, help="inference GPUs")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--trainer-gpus", type=int, default=0, help="0: colocated on the inference GPUs")
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nvlink", type=float, default=450.0, help="GB/s per GPU per direction (vendor)")
    ap.add_argument("--nic", type=float, default=50.0, help="GB/s per GPU (vendor: 400 Gb/s)")
    ap.add_argument("--efficiency", type=float, default=1.0)
    ap.add_argument("--stream-cap", type=float, default=None, help="GB/s cap on one broadcast spanning nodes")
    ap.add_argument("--per-tensor-us", type=float, default=0.0)
    args = ap.parse_args()
    if args.model is None and args.model_bytes is None:
        emit(headline(), indent=1)
        return
    spec = dict(MODELS[args.model]) if args.model else {"model_bytes": args.model_bytes}
    w = Workload(num_gpus=args.gpus, tp=args.tp, trainer_gpus=args.trainer_gpus,
                 bucket_bytes=args.bucket_mb * 2**20, **spec)
    hw = Hardware(gpus_per_node=args.gpus_per_node, nvlink_GBps=args.nvlink, nic_GBps=args.nic,
                  link_efficiency=args.efficiency, stream_cap_GBps=args.stream_cap)
    emit({"workload": w.__dict__, "hardware": hw.__dict__,
                      **compare(w, hw, SyncRates(per_tensor_s=args.per_tensor_us * 1e-6),
                                CeRates(per_tensor_s=args.per_tensor_us * 1e-6))}, indent=1)


if __name__ == "__main__":
    main()
