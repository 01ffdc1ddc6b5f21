"""Delta pushes (issue 16): how many bf16 wire elements really change per RL step, and what the delta encoding costs.

A tiny Qwen3 built in code (nothing downloaded; default ~100 M parameters, ~400 MB of fp32 master weights, ~200 MB
of bf16 wire values) trains for --steps real AdamW steps on fp32 master weights (causal-LM loss on fixed random
token batches), once per learning rate. After every step the wire values (``master.to(bfloat16)``, packed at
256-byte offsets into --bucket-mb buckets, as pushes pack them) are encoded against the previous step's with
trainer_sync.codec.delta.format (the smallest of full / bitmask / gap-coded indices per bucket) and applied in place to
a receiver's copy, which must equal the trainer's wire values bit for bit after every step. Per learning rate it
reports the changed fraction, the encoded bytes per push against a full push, the encodings chosen, and the
encode / apply seconds per push (on CPU; with --device cuda also on the GPU). Prints one JSON object.

    python -m benchmarks.bench_delta [--steps 50] [--lrs 1e-6,1e-5] [--hidden 768 --layers 8 --vocab 32000]
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from trainer_sync.codec import delta as D
from benchmarks.common import emit, parser

ALIGN = 256


def build_model(args):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                         num_key_value_heads=max(1, args.hidden // args.head_dim // 3), head_dim=args.head_dim,
                         max_position_embeddings=2 * args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(args.device)


def layout(model, bucket_bytes: int):
    """Each parameter at a 256-byte offset of one flat bf16 wire buffer, cut into buckets of at most bucket_bytes
    (a parameter larger than a bucket is split, as FSDP shards and the planner split them)."""
    offsets, at = [], 0
    for _, p in model.named_parameters():
        offsets.append(at)
        at += -(-p.numel() * 2 // ALIGN) * ALIGN // 2
    total = at
    per = bucket_bytes // 2
    cuts = list(range(0, total, per)) + [total]
    return offsets, total, list(zip(cuts, cuts[1:]))


def wire_values(model, offsets, total, out: torch.Tensor) -> torch.Tensor:
    for (_, p), o in zip(model.named_parameters(), offsets):
        out[o:o + p.numel()].copy_(p.detach().reshape(-1))  # the fp32 -> bf16 cast of a push's pack
    return out


def category(name: str) -> str:
    for key in ("embed_tokens", "lm_head", "norm", "self_attn", "mlp"):
        if key in name:
            return key
    return "other"


def run_lr(args, lr: float, batches) -> dict:
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    offsets, total, buckets = layout(model, int(args.bucket_mb * 2**20))
    dev = torch.device(args.device)
    prev = wire_values(model, offsets, total, torch.zeros(total, dtype=torch.bfloat16, device=dev))
    new = torch.zeros_like(prev)
    receiver = prev.cpu().clone()  # the engine's copy, updated only through the deltas (applied on CPU)
    receiver_dev = prev.clone() if dev.type == "cuda" else None
    targets = [D.sums(prev[a:z]) for a, z in buckets]  # the sender keeps each bucket's sums (next base)
    steps = []
    for step in range(args.steps):
        tokens = batches[step % len(batches)].to(dev)
        t = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t
        wire_values(model, offsets, total, new)
        rec = {"step": step + 1, "loss": round(float(loss.detach()), 4), "train_s": step_s, "changed": 0, "bytes": 0,
               "kinds": {}, "encode_cpu_s": 0.0, "apply_cpu_s": 0.0}
        prev_cpu, new_cpu = (prev.cpu(), new.cpu()) if dev.type == "cuda" else (prev, new)
        if dev.type == "cuda":
            rec.update(encode_gpu_s=0.0, apply_gpu_s=0.0)
        sizes = []
        for i, (a, z) in enumerate(buckets):
            t = time.perf_counter()
            buf, st = D.encode(prev_cpu[a:z], new_cpu[a:z], base=targets[i])
            rec["encode_cpu_s"] += time.perf_counter() - t
            t = time.perf_counter()
            D.decode_into(receiver[a:z], buf, verify=args.verify)
            rec["apply_cpu_s"] += time.perf_counter() - t
            if dev.type == "cuda":
                torch.cuda.synchronize()
                t = time.perf_counter()
                gbuf, _ = D.encode(prev[a:z], new[a:z], base=targets[i])
                torch.cuda.synchronize()
                rec["encode_gpu_s"] += time.perf_counter() - t
                t = time.perf_counter()
                D.decode_into(receiver_dev[a:z], gbuf, verify=args.verify)
                torch.cuda.synchronize()
                rec["apply_gpu_s"] += time.perf_counter() - t
            targets[i] = st.target
            sizes.append((2 * (z - a), st.nbytes - D.HEADER_BYTES))
            rec["changed"] += st.changed
            rec["bytes"] += st.nbytes
            kind = D.KIND_NAMES[st.kind]
            rec["kinds"][kind] = rec["kinds"].get(kind, 0) + 1
        if step + 1 == args.steps:  # which tensors change (the last step)
            per = {}
            for (nm, p), o in zip(model.named_parameters(), offsets):
                c = category(nm)
                k = int((prev_cpu[o:o + p.numel()].view(torch.int16) != new_cpu[o:o + p.numel()].view(torch.int16))
                        .sum())
                n0, k0 = per.get(c, (0, 0))
                per[c] = (n0 + p.numel(), k0 + k)
            rec["by_category"] = {c: round(k / n, 5) for c, (n, k) in per.items()}
        if not torch.equal(receiver.view(torch.int16), new_cpu.view(torch.int16)):
            raise AssertionError(f"lr {lr}, step {step + 1}: the receiver's copy differs from the wire values")
        if receiver_dev is not None and not torch.equal(receiver_dev.view(torch.int16), new.view(torch.int16)):
            raise AssertionError(f"lr {lr}, step {step + 1}: the GPU receiver's copy differs")
        prev, new = new, prev
        rec["changed_fraction"] = rec["changed"] / total
        rec["sizes"] = sizes
        steps.append(rec)
        if args.verbose:
            print(json.dumps({k: v for k, v in rec.items() if k != "by_category"}), flush=True)
    numel = sum(p.numel() for p in model.parameters())
    fr = [r["changed_fraction"] for r in steps]
    by = [r["bytes"] for r in steps]
    full = total * 2

    def stat(xs, nd=6):
        return {"mean": round(statistics.fmean(xs), nd), "median": round(statistics.median(xs), nd),
                "min": round(min(xs), nd), "max": round(max(xs), nd), "first": round(xs[0], nd),
                "last": round(xs[-1], nd)}

    kinds = {}
    for r in steps:
        for k, v in r["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    out = {"lr": lr, "params": numel, "wire_bytes_full": full, "buckets": len(buckets),
           "changed_fraction": stat(fr), "bytes_per_push": stat(by, 0),
           "full_over_delta_bytes": round(full / statistics.fmean(by), 2),
           "encodings_chosen": kinds, "by_category_last_step": steps[-1]["by_category"],
           "train_step_s": round(statistics.median(r["train_s"] for r in steps), 3),
           "encode_cpu_s_per_push": round(statistics.median(r["encode_cpu_s"] for r in steps), 4),
           "apply_cpu_s_per_push": round(statistics.median(r["apply_cpu_s"] for r in steps), 4),
           "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]]}
    if args.wire_iters:
        full_sizes, delta_sizes = zip(*steps[-1]["sizes"])
        wire = wire_times(list(full_sizes), list(delta_sizes), args.wire_iters)
        enc, app = out["encode_cpu_s_per_push"], out["apply_cpu_s_per_push"]
        out["wire_loopback_gloo_s"] = {"full": round(wire["full"], 4), "delta": round(wire["delta"], 4),
                                       "wire_speedup": round(wire["full"] / wire["delta"], 1),
                                       "delta_with_cpu_encode_apply": round(wire["delta"] + enc + app, 4)}
    if dev.type == "cuda":
        out["encode_gpu_s_per_push"] = round(statistics.median(r["encode_gpu_s"] for r in steps), 5)
        out["apply_gpu_s_per_push"] = round(statistics.median(r["apply_gpu_s"] for r in steps), 5)
    return out


def _wire_role(rank: int, port: int, full_sizes: list[int], delta_sizes: list[int], iters: int, out) -> None:
    """One of two processes: broadcast the buckets of one push over gloo, full and as deltas (two broadcasts a
    bucket: the 48-byte header, then the body), and time it; the contents do not matter to the wire."""
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))
    bufs = {n: torch.zeros(n, dtype=torch.uint8) for n in set(full_sizes) | set(delta_sizes) | {D.HEADER_BYTES}}

    def bcast(t):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return group.broadcast([t], opts)

    def push(sizes, header):
        works = []
        for n in sizes:
            if header:
                works.append(bcast(bufs[D.HEADER_BYTES]))
            works.append(bcast(bufs[n]))
        for w in works:
            w.wait()

    times = {"full": [], "delta": []}
    for it in range(iters + 1):
        for name, sizes, header in (("full", full_sizes, False), ("delta", delta_sizes, True)):
            group.barrier().wait()
            t = time.perf_counter()
            push(sizes, header)
            if it:
                times[name].append(time.perf_counter() - t)
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in times.items()})


def wire_times(full_sizes: list[int], delta_sizes: list[int], iters: int) -> dict:
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_wire_role, args=(r, port, full_sizes, delta_sizes, iters, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    res = q.get(timeout=600)
    for pr in procs:
        pr.join()
    return res


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lrs", default="1e-6,1e-5")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8, help="distinct token batches, cycled")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the receiver's check of the result checksum (the base check always runs)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--wire-iters", type=int, default=5,
                    help="time the last push's buckets on the wire, full vs delta, over loopback gloo between two "
                         "processes (median of this many; 0: skip)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    t0 = time.perf_counter()
    results = [run_lr(args, float(lr), batches) for lr in args.lrs.split(",")]
    emit({"benchmark": "delta", "model": {"hidden": args.hidden, "inter": args.inter,
                                                      "layers": args.layers, "vocab": args.vocab},
                      "steps": args.steps, "bucket_mb": args.bucket_mb, "device": args.device,
                      "torch_threads": torch.get_num_threads(), "weight_decay": args.weight_decay,
                      "results": results, "wall_s": round(time.perf_counter() - t0, 1)}, indent=1)


if __name__ == "__main__":
    main()
