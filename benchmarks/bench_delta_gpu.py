"""What a delta costs on the device that holds the bucket (issue 16): encode and apply of one bucket, GPU vs CPU.

A GPU trainer packs its buckets in GPU memory, so its delta encode runs there (delta.py's torch path on CUDA tensors);
a CPU trainer's runs through the native kernels (codec/delta/native.c). Per changed fraction this times, side by side
in one run on the same bytes: the pack itself (fp32 master -> bf16 wire buffer, what a full push costs before the
wire), ``delta.encode`` against the cached previous bucket with its sums known (what a sender does), and
``delta.decode_into`` on a destination holding the base (what a receiver does, base check and result check
included); on the GPU and on the host. The update is synthetic but at the measured density: fp32 master weights
~N(0, 0.02), of which a random fraction (default: 1.17 % and 7.49 %, the median changed fractions that
bench_delta_push.py measured over real AdamW steps at lr 1e-6 and 1e-5) is moved far enough to change its bf16
value. Prints one JSON object.

    python -m benchmarks.bench_delta_gpu [--mb 64] [--fractions 0.0117,0.0749] [--repeat 10]
"""
from __future__ import annotations

import statistics
import time

import torch

from trainer_sync.codec import delta as D
from trainer_sync.codec.delta import native as delta_scan
from benchmarks.common import emit, parser


def _time(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn`` (synchronized on CUDA)."""
    out = []
    for _ in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out[1:])  # the first call warms up


def measure(device: str, master: torch.Tensor, fraction: float, repeat: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    moved = torch.rand(master.numel(), generator=g) < fraction
    step = torch.where(moved, master.abs() * 0.02 + 1e-6, torch.zeros(())).to(device)  # > a bf16 spacing
    m0 = master.to(device)
    m1 = m0 + step
    prev = m0.to(torch.bfloat16)
    new = torch.empty_like(prev)
    pack_s = _time(lambda: new.copy_(m1), device, repeat)  # the cast into the wire buffer
    base = D.sums(prev)
    enc, st = D.encode(prev, new, base=base)
    encode_s = _time(lambda: D.encode(prev, new, base=base), device, repeat)
    dest = prev.clone()

    def apply():
        dest.copy_(prev)  # back to the base (timed separately, subtracted)
        D.decode_into(dest, enc)

    reset_s = _time(lambda: dest.copy_(prev), device, repeat)
    apply_s = max(_time(apply, device, repeat) - reset_s, 0.0)
    ok = torch.equal(dest.view(torch.int16), new.view(torch.int16))
    return {"changed_fraction": round(st.changed_fraction, 6), "encoding": D.KIND_NAMES[st.kind], "bytes": st.nbytes,
            "full_bytes": st.full_nbytes, "pack_s": round(pack_s, 6), "encode_s": round(encode_s, 6),
            "apply_s": round(apply_s, 6), "encode_over_pack": round(encode_s / pack_s, 2), "bit_exact": ok}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--mb", type=float, default=64.0, help="bucket size in MB of bf16 wire values")
    ap.add_argument("--fractions", default="0.0117,0.0749")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--cpu-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.cpu_threads)
    n = int(args.mb * 2 ** 20) // 2
    master = torch.randn(n, generator=torch.Generator().manual_seed(0)).mul_(0.02)
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    rows = []
    for frac in (float(x) for x in args.fractions.split(",")):
        rows.append({"fraction": frac, **{dev: measure(dev, master, frac, args.repeat) for dev in devices}})
    emit({"benchmark": "delta_gpu", "bucket_mb": args.mb, "elements": n,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "cpu_threads": args.cpu_threads, "native_cpu_kernels": delta_scan.enabled(), "results": rows})


if __name__ == "__main__":
    main()
