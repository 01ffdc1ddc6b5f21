"""Core data path benchmark (CPU, gloo): trainer_sync push vs one raw broadcast vs per-tensor broadcasts.

A many-tensor model (default 1200 tensors, ~300 MB fp32) on 2 trainer ranks (plain module: each rank holds
everything, trainer_sync splits the sending), pushed to 1 and then 2 receiver processes. In the same run and the
same processes:
  * trainer_sync: Sender.push() end to end (handshake, pack, transfer, receivers' apply callback, acknowledgements);
  * raw: the same bytes as ONE flat gloo broadcast from trainer rank 0 (the floor for a single root);
  * one-by-one: each tensor broadcast separately followed by a barrier, as TRL's and OpenRLHF's vLLM clients do.
Each figure is the median of --iters runs after a warm-up. Prints one JSON object.

    python -m benchmarks.bench_core [--tensors 1200] [--mb 300] [--iters 3]
"""
from __future__ import annotations

import argparse
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer_sync import Receiver, Sender, SyncConfig
from benchmarks.common import emit, parser, timed
from trainer_sync.testing.local_cluster import free_port, run_roles
from trainer_sync.pipeline.loops import broadcast_bucket
from trainer_sync.protocol.messages import JoinInfo
from trainer_sync.transport.group import make_group


def build(tensors: int, mb: float) -> torch.nn.ParameterDict:
    per = int(mb * 2**20 / 4 / tensors)
    torch.manual_seed(0)
    return torch.nn.ParameterDict({f"t{i:04d}": torch.nn.Parameter(torch.randn(per)) for i in range(tensors)})


def baseline_group(port: int, rank: int, size: int):
    store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, timeout=timedelta(seconds=120))
    return store, make_group(dist.PrefixStore("raw/", store), rank, size, "gloo", 120)


def _timed(fn, iters: int) -> list[float]:
    return timed(fn, reps=iters, warmup=1)  # the first call is a warm-up


def trainer(rank, world, n, port, raw_port, tensors, mb, iters):
    model = build(tensors, mb)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="bench", bucket_mb=32, timeout_s=300))
    sender.connect(n)
    ours = _timed(lambda: sender.push(), iters)
    sender.close()
    result = {"ours": ours}
    dist.barrier()
    if rank == 0:  # baselines: a single root holding everything, as TRL / OpenRLHF do
        store, pg = baseline_group(raw_port, 0, 1 + n)
        flat = torch.cat([p.detach().reshape(-1) for p in model.values()])
        result["raw"] = _timed(lambda: broadcast_bucket(pg, flat).wait(), iters)
        params = [p.detach() for p in model.values()]

        def one_by_one():
            for p in params:
                broadcast_bucket(pg, p).wait()
                pg.barrier().wait()
        result["one_by_one"] = _timed(one_by_one, iters)
        pg.shutdown()
    return result


def receiver(j, n, m, port, raw_port, tensors, mb, iters):
    sink = build(tensors, mb)  # what a receiver holds; the callback copies into it by name, as an engine would
    sink_by_name = {k: p.detach() for k, p in sink.items()}
    r = Receiver(JoinInfo("127.0.0.1", port, "bench", 0, m, n, j, "gloo", 300))
    r.connect()
    for _ in range(iters + 1):
        r.receive(lambda batch: [sink_by_name[k].copy_(v) for k, v in batch])
    r.close()
    store, pg = baseline_group(raw_port, 1 + j, 1 + n)
    flat = torch.empty(sum(p.numel() for p in sink.values()))
    for _ in range(iters + 1):
        broadcast_bucket(pg, flat).wait()
    params = list(sink_by_name.values())
    for _ in range(iters + 1):
        for p in params:
            broadcast_bucket(pg, p).wait()
            pg.barrier().wait()
    pg.shutdown()
    return None


def run(n: int, args) -> dict:
    port, raw_port = free_port(), free_port()
    common = (port, raw_port, args.tensors, args.mb, args.iters)
    res = run_roles([("trainer", r, 2, trainer, (n, *common)) for r in range(2)]
                    + [("receiver", j, n, receiver, (2, *common)) for j in range(n)], timeout=1800)
    t0 = res[("trainer", 0)]
    ours = statistics.median(max(a, b) for a, b in zip(t0["ours"], res[("trainer", 1)]["ours"]))
    raw, obo = statistics.median(t0["raw"]), statistics.median(t0["one_by_one"])
    return {"receivers": n, "trainer_sync_s": round(ours, 4), "raw_broadcast_s": round(raw, 4),
            "one_by_one_s": round(obo, 4), "vs_raw": round(ours / raw, 3),
            "speedup_vs_one_by_one": round(obo / ours, 2)}


def parse_args(doc: str | None = None, prog: str | None = None) -> argparse.Namespace:
    """The model and repetitions of the CPU benchmarks (this one and bench_catchup.py, which passes its own doc)."""
    ap = parser(doc or __doc__, prog=prog)
    ap.add_argument("--tensors", type=int, default=1200, help="tensors in the model")
    ap.add_argument("--mb", type=float, default=300, help="the model's size in MiB (fp32)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs per figure (the median is reported)")
    args = ap.parse_args()
    for name in ("tensors", "mb", "iters"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args(prog="trainer-sync bench")
    rows = [run(n, args) for n in (1, 2)]
    emit({"benchmark": "core_cpu_gloo", "trainer_ranks": 2, "tensors": args.tensors,
                      "bytes": int(args.mb * 2**20), "results": rows})


if __name__ == "__main__":
    main()
