"""What every benchmark shares: one timer (CUDA events on a GPU, perf_counter elsewhere), summary statistics, and
the JSON line a benchmark prints last. Only torch and the standard library: the GPU image runs these scripts without
every dependency of trainer_sync."""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu", reps: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls: CUDA events on a GPU (the
    device is synchronized after the warm-up), perf_counter elsewhere."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def stats(xs: list[float]) -> dict:
    """Median, min, max and the samples, in seconds (rounded to microseconds)."""
    return {"median_s": round(statistics.median(xs), 6), "min_s": round(min(xs), 6), "max_s": round(max(xs), 6),
            "samples_s": [round(x, 6) for x in xs]}


def emit(result, file=None, **json_kw) -> None:
    """Print one benchmark result as a JSON line (stdout by default), flushed."""
    print(json.dumps(result, **json_kw), file=file or sys.stdout, flush=True)
