"""Delta pushes through the REAL push path (issue 16): delta vs full push seconds on CPU gloo, side by side.

One trainer process holds a tiny Qwen3 built in code (default: hidden 768, 8 layers, vocab 32000, ~100 M
parameters = ~400 MB of fp32 master weights, ~200 MB of bf16 wire values) and, per link, two Senders over the same
model: ``delta="auto"`` to one receiver process and ``delta="off"`` to another. The links (``--links``): loopback
(CPU-bound here: a few GB/s) and rate-limited links made for real with a network namespace + veth + tc tbf per
rate (benchmarks/shaped_link.py; e.g. 1000 = 1 Gbit/s, trainer and engines on different hosts over ordinary
Ethernet: the bandwidth-bound case). Every receiver writes every push into its own bf16 tensors in place
(``Receiver(..., targets=...)``: the served tensors). Per learning rate the model starts from the same weights with
a fresh AdamW (weight decay 0), and each of ``--steps`` real steps (causal-LM loss on fixed random token batches) is
followed, link after link, by a delta push and then a full push of the same weights. Reported per learning rate
and link: the changed fraction and bytes per push (SyncReport.changed_fraction / bytes_sent / bytes_full), push
seconds (SyncReport.total_s, medians) delta vs full with their stages, and a bit-exact check of every receiver
against the trainer's bf16 weights at the end. The measured byte ratios then go into the push simulator
(benchmarks/simulate.py) for the 1T-parameter / 256-GPU case. Prints one JSON object; ``--out`` saves it.

    python -m benchmarks.bench_delta_push [--steps 50] [--lrs 1e-6,1e-5] [--links loopback,1000]
                                          [--out benchmarks/results/x.json]
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
from benchmarks.common import parser

BF16 = torch.bfloat16


def _model(args, device="cpu"):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                         num_key_value_heads=max(1, args.hidden // args.head_dim // 3), head_dim=args.head_dim,
                         max_position_embeddings=2 * args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _cfg(port: int, args, delta: str, host: str):
    from trainer_sync import SyncConfig

    return SyncConfig(host=host, port=port, token="bench", bucket_mb=args.bucket_mb, wire_dtype="bfloat16",
                      timeout_s=300, delta=delta)


KINDS = ("delta", "full")


def _stats(xs, nd=6):
    return {"median": round(statistics.median(xs), nd), "mean": round(statistics.fmean(xs), nd),
            "min": round(min(xs), nd), "max": round(max(xs), nd)} if xs else None


def _digest(bits: torch.Tensor) -> list[int]:
    """A tensor's bf16 bit patterns, summed two ways (equal digests on both sides: the same bits, for the test's
    purpose; the tests check bit-exactness element by element)."""
    flat = bits.reshape(-1).to(torch.int64)
    return [int(flat.sum()), int((flat * (torch.arange(flat.numel()) % 65521)).sum())]


def trainer(rank, world, channels, args):
    """``channels``: (link name, kind, host, port) per Sender."""
    from trainer_sync import Sender

    model = _model(args)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    senders = {(link, kind): Sender(model, _cfg(port, args, "auto" if kind == "delta" else "off", host))
               for link, kind, host, port in channels}
    for s in senders.values():
        s.connect(1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    results = []
    for lr in args.lrs:
        model.load_state_dict(initial)  # the same start for every learning rate (the parameters stay the same objects)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        reports = {key: [] for key in senders}
        train_s, losses = [], []
        for step in range(args.steps + 1):  # step 0: no training, the push of the start weights (the base)
            if step:
                torch.set_num_threads(args.train_threads)
                t = time.perf_counter()
                ids = batches[(step - 1) % len(batches)]
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_s.append(time.perf_counter() - t)
                losses.append(loss.item())
                torch.set_num_threads(1)
            for key in senders:  # link after link: the delta push, then the full push of the same weights
                reports[key].append(senders[key].push().to_dict())
        want = {n: p.detach().to(BF16).view(torch.int16) for n, p in model.named_parameters()}
        digest = {n: _digest(w) for n, w in want.items()}
        results.append({"lr": lr, "reports": {f"{link}/{kind}": r for (link, kind), r in reports.items()},
                        "train_s": train_s, "loss_first_last": [losses[0], losses[-1]],
                        "digest": digest})
    for s in senders.values():
        s.close()
    return {"results": results, "params": sum(p.numel() for p in model.parameters())}


def receiver(j, world, host, port, netns, args, pushes):
    from benchmarks.shaped_link import enter
    from trainer_sync import Receiver
    from trainer_sync.protocol.messages import JoinInfo

    enter(netns)  # first: the store client and gloo's sockets and threads come later, in the link's namespace
    shapes = {n: p.shape for n, p in _model(args, "meta").named_parameters()}
    targets = {n: torch.zeros(s, dtype=BF16) for n, s in shapes.items()}
    r = Receiver(JoinInfo(host, port, "bench", 0, 1, 1, 0, "gloo", 300.0), targets=targets)
    r.connect()
    digests = []
    for k in range(pushes):
        r.receive(lambda batch: None)  # the targets are the served tensors: nothing else to do
        if (k + 1) % (args.steps + 1) == 0:  # the last push of a learning rate
            digests.append({n: _digest(t.view(torch.int16)) for n, t in targets.items()})
    r.close()
    return digests


def _link_row(d: list[dict], f: list[dict]) -> dict:
    """Delta vs full pushes of one link (the base push of the start weights left out)."""
    ds, fs = [x["total_s"] for x in d], [x["total_s"] for x in f]
    return {"push_s": {"delta": _stats(ds, 4), "full": _stats(fs, 4)},
            "full_over_delta_seconds": round(statistics.median(fs) / statistics.median(ds), 2),
            "stages_median_s": {kind: {s: round(statistics.median(x[s] for x in rep), 4)
                                       for s in ("plan_s", "pack_s", "transfer_s", "apply_s")}
                                for kind, rep in (("delta", d), ("full", f))}}


def summarize(res: dict, links: list[str]) -> dict:
    out = []
    for k, r in enumerate(res["trainer"]["results"]):
        rep = {key: v[1:] for key, v in r["reports"].items()}  # without the base push of the start weights
        d = rep[f"{links[0]}/delta"]
        full_bytes = rep[f"{links[0]}/full"][0]["bytes"]
        sent = [x["bytes_sent"] for x in d]
        exact = all(digests[k] == r["digest"] for digests in res["receivers"].values())
        out.append({
            "lr": r["lr"],
            "changed_fraction": _stats([x["changed_fraction"] for x in d]),
            "changed_fraction_first_step": d[0]["changed_fraction"],
            "bytes_full": full_bytes,
            "bytes_per_delta_push": _stats(sent, 0),
            "full_over_delta_bytes": round(full_bytes / statistics.median(sent), 2),
            "full_reasons": sorted({str(x["full_reason"]) for key in rep if key.endswith("/delta") for x in rep[key]}),
            "links": {link: _link_row(rep[f"{link}/delta"], rep[f"{link}/full"]) for link in links},
            "train_step_s": round(statistics.median(r["train_s"]), 3),
            "loss_first_last": [round(x, 4) for x in r["loss_first_last"]],
            "receivers_bit_exact": exact,
        })
    return {"params": res["trainer"]["params"], "results": out}


def simulate(results: list[dict]) -> dict:
    """The measured byte ratios in the push model: 1T FP8 on 256 GPUs, TP16, colocated (simulate_push's headline),
    full vs delta. The ratio is measured on bf16 wire values of a small model; fp8's coarser spacing would change
    fewer elements per step, so this is if anything pessimistic for the bytes (an assumption, not a measurement)."""
    from benchmarks.simulate import KIMI_K2_FP8, Hardware, SyncRates, Workload, simulate_trainer_sync

    w = Workload(num_gpus=256, tp=16, **KIMI_K2_FP8)
    out = {}
    for label, hw in (("node_nic_aggregate", Hardware()), ("stream_cap_50GBps", Hardware(stream_cap_GBps=50.0))):
        full = simulate_trainer_sync(w, hw, SyncRates())
        row = {"full_s": round(full.seconds, 3), "full_bottleneck": full.bottleneck}
        for r in results:
            frac = 1.0 / r["full_over_delta_bytes"]
            est = simulate_trainer_sync(w, hw, SyncRates(wire_fraction=frac))
            row[f"lr_{r['lr']:g}"] = {"wire_fraction": round(frac, 4), "delta_s": round(est.seconds, 3),
                                      "bottleneck": est.bottleneck, "speedup": round(full.seconds / est.seconds, 2)}
        out[label] = row
    return out


def _native() -> bool:
    from trainer_sync.codec.delta import native as delta_scan

    return delta_scan.enabled()


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
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--train-threads", type=int, default=2, help="torch threads of the training step (pushes: 1)")
    ap.add_argument("--links", default="loopback,1000",
                    help="loopback and/or link rates in Mbit/s, each a shaped veth (benchmarks/shaped_link.py)")
    ap.add_argument("--timeout", type=float, default=2400.0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    args.lrs = [float(x) for x in args.lrs.split(",")]
    from benchmarks import shaped_link
    from trainer_sync.testing.local_cluster import free_port, run_roles

    t0 = time.perf_counter()
    wanted = [x.strip() for x in args.links.split(",") if x.strip()]
    rates = [int(x) for x in wanted if x != "loopback"]
    skipped = shaped_link.available() if rates else None
    if skipped:
        print(f"bench_delta_push: no shaped links ({skipped}); loopback only", flush=True)
        rates = []
    pushes = len(args.lrs) * (args.steps + 1)
    with shaped_link.shaped_links(rates) as shaped:
        links = ([shaped_link.LOOPBACK] if "loopback" in wanted or not rates else []) + shaped
        channels = [(link, kind, free_port()) for link in links for kind in KINDS]
        ends = [(link.name, k, link.trainer_host, p) for link, k, p in channels]
        roles = [("trainer", 0, 1, trainer, (ends, args))]
        roles += [("receiver", i, 1, receiver, (link.receiver_host, p, link.netns, args, pushes))
                  for i, (link, k, p) in enumerate(channels)]
        res = run_roles(roles, timeout=args.timeout)
    names = [link.name for link in links]
    receivers = {f"{link.name}/{k}": res[("receiver", i)] for i, (link, k, _) in enumerate(channels)}
    summary = summarize({"trainer": res[("trainer", 0)], "receivers": receivers}, names)
    out = {"benchmark": "delta_push",
           "path": "Sender -> Receiver processes, CPU gloo, bf16 wire; links: " + ", ".join(
               "loopback" if link.rate_mbit is None else f"veth + tc tbf at {link.rate_mbit} Mbit/s"
               for link in links),
           "model": {"hidden": args.hidden, "inter": args.inter, "layers": args.layers, "vocab": args.vocab},
           "steps": args.steps, "bucket_mb": args.bucket_mb, "cpus": os.cpu_count(), "native_delta_kernels":
           _native(), **summary,
           "simulated_1T_256_gpus_tp16": simulate(summary["results"]), "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(out)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
