"""What every benchmark shares: one timer (CUDA events on a GPU, perf_counter elsewhere), summary statistics, and
the JSON line a benchmark prints last. Only torch and the standard library: the GPU image runs these scripts without
every dependency of trainer_sync."""
from __future__ import annotations

import argparse
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


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept, and every option's default shown."""


class BenchParser(argparse.ArgumentParser):
    """``--help`` with the benchmark's docstring and every option's default (an option given no help still shows
    its default: argparse prints nothing for it otherwise)."""

    def __init__(self, doc: str | None, **kw):
        super().__init__(description=(doc or "").strip(), formatter_class=_Help, **kw)

    def add_argument(self, *args, **kw):
        if kw.get("action") not in ("store_true", "store_false", "help", "version") and not kw.get("help"):
            kw["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kw)


def parser(doc: str | None, **kw) -> BenchParser:
    return BenchParser(doc, **kw)


def table(result, limit: int = 40) -> list[str]:
    """A short human table of a result: each timing (a dict with ``median_s``) as ms, each other number as it is,
    by its path in the JSON; lists of samples left out. At most ``limit`` rows."""
    rows: list[tuple[str, str]] = []

    def walk(x, path: str) -> None:
        if isinstance(x, dict):
            if "median_s" in x:
                rows.append((path, f"{x['median_s'] * 1e3:.2f} ms (min {x.get('min_s', 0) * 1e3:.2f}, "
                                   f"max {x.get('max_s', 0) * 1e3:.2f})"))
                return
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, bool) or x is None:
            return
        elif isinstance(x, (int, float)):
            rows.append((path, f"{x:.4g}" if isinstance(x, float) else str(x)))

    walk(result, "")
    width = max((len(k) for k, _ in rows[:limit]), default=0)
    out = [f"  {k:<{width}}  {v}" for k, v in rows[:limit]]
    if len(rows) > limit:
        out.append(f"  ... {len(rows) - limit} more in the JSON line")
    return out


def emit(result, file=None, **json_kw) -> None:
    """Print one benchmark result as a JSON line (stdout by default), flushed, and a short human table of it to
    stderr (the JSON line stays the last line of stdout, for scripts)."""
    lines = table(result)
    if lines:
        print("\n".join(["result:", *lines]), file=sys.stderr, flush=True)
    print(json.dumps(result, **json_kw), file=file or sys.stdout, flush=True)
