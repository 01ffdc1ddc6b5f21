"""P2P catch-up vs broadcast push of the same bytes (CPU, gloo), in one run.

2 trainer ranks hold a many-tensor model (default 1200 fp32 tensors, 300 MiB) and keep their share of the latest
version (SyncConfig(keep_latest=True)). One receiver takes --iters pushes by broadcast (median reported); then a
joining receiver pulls the latest version point to point from both trainer ranks in parallel (median of --iters
joins). Both receivers copy every tensor into their own model by name, as an engine would. Prints one JSON object.
checkpoint-engine publishes its P2P path at 1.1-2.2x its broadcast; the aim here is at most 1.3x.

    python -m benchmarks.bench_catchup [--tensors 1200] [--mb 300] [--iters 3]
"""
from __future__ import annotations

import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist


from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.rank.catchup import pull_latest
from trainer_sync.testing.local_cluster import free_port, run_roles
from trainer_sync.pipeline.loops import BufferPool
from trainer_sync.protocol.messages import JoinInfo

from benchmarks.bench_core import build, parse_args
from benchmarks.common import emit


def trainer(rank, world, port, tensors, mb, iters):
    sender = Sender(build(tensors, mb), SyncConfig(port=port if rank == 0 else 0, token="bench", bucket_mb=32,
                                                   timeout_s=300, keep_latest=True))
    sender.connect(1)
    pushes = []
    for _ in range(iters + 1):
        t = time.perf_counter()
        sender.push()
        pushes.append(time.perf_counter() - t)
    store = sender.rdzv.store
    store.set(f"bench/pushed/{rank}", "1")
    store.wait(["bench/joined"], timedelta(seconds=600))
    sender.close()
    return pushes[1:]


def receiver(j, n, port, tensors, mb, iters):
    sink = {k: p.detach() for k, p in build(tensors, mb).items()}
    r = Receiver(JoinInfo("127.0.0.1", port, "bench", 0, 2, 1, 0, "gloo", 300))
    r.connect()
    for _ in range(iters + 1):
        r.receive(lambda batch: [sink[k].copy_(v) for k, v in batch])
    r.close()


def joiner(j, n, port, tensors, mb, iters):
    sink = {k: p.detach() for k, p in build(tensors, mb).items()}
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=600))
    store.wait(["bench/pushed/0", "bench/pushed/1"])
    pulls, pool = [], BufferPool(torch.device("cpu"))  # kept across pulls, as a receiver keeps its buffers
    try:
        for _ in range(iters + 1):
            t = time.perf_counter()
            pull_latest("127.0.0.1", port, "bench", 2, lambda batch: [sink[k].copy_(v) for k, v in batch],
                        timeout_s=300, pool=pool)
            pulls.append(time.perf_counter() - t)
    finally:
        store.set("bench/joined", "1")  # release the trainers even if a pull failed
    return pulls[1:]


def main() -> None:
    args = parse_args(__doc__)
    port = free_port()
    common = (port, args.tensors, args.mb, args.iters)
    res = run_roles([("trainer", r, 2, trainer, common) for r in range(2)]
                    + [("receiver", 0, 1, receiver, common), ("joiner", 0, 1, joiner, common)], timeout=1800)
    push = statistics.median(max(a, b) for a, b in zip(res[("trainer", 0)], res[("trainer", 1)]))
    pull = statistics.median(res[("joiner", 0)])
    emit({"benchmark": "catchup_cpu_gloo", "trainer_ranks": 2, "tensors": args.tensors,
                      "bytes": int(args.mb * 2**20), "broadcast_push_s": round(push, 4),
                      "p2p_catchup_s": round(pull, 4), "catchup_vs_push": round(pull / push, 3)})


if __name__ == "__main__":
    main()
