"""Sender and Receiver without vLLM: one trainer process pushes a model into two receiver processes, which keep
their own copy of it up to date (bit for bit), over a gloo group on CPU (NCCL on GPUs).

    .venv/bin/python examples/sender_receiver.py     # ~20 s

The trainer hands each receiver its join info (a JSON-able dict; here through a multiprocessing queue, in a real
system through whatever you already use: a file, an RPC, an environment variable). Each receiver checks the
trainer's plan against what it expects (names, shapes, dtypes) before any byte moves.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp

import torch

from trainer_sync import Receiver, Sender, SyncConfig

PUSHES = 3


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))


def digests(model: torch.nn.Module) -> dict[str, str]:
    """One sha256 per tensor, of its bytes: equal digests, equal bits."""
    return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def trainer(inboxes, results) -> None:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # every trainer rank (plain / DDP / FSDP2 / DeepSpeed ZeRO-3 model):
    sender = Sender(model, SyncConfig(token="secret"))
    info = [sender.join_info(j, num_receivers=2).to_dict() for j in range(2)]   # one JSON-able dict per receiver
    for j in range(2):
        inboxes[j].put(info[j])  # ... deliver info[j] to receiver j: connect() blocks until every receiver joined
    sender.connect(num_receivers=2)
    for _ in range(PUSHES):
        model(torch.randn(8, 256)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        report = sender.push()      # after each optimizer step, every trainer rank together
        print(report)   # v1: 0.3 MB in 1 bucket to 2 receivers, total 41.0 ms (plan .., pack .., transfer .., apply ..)
    sender.close()
    results.put(("trainer", digests(model), sender.version))


def receiver(j: int, inbox, results, build=build_model, pushes: int = PUSHES) -> None:
    info_j = inbox.get()
    model = build()  # the receiver's own copy of the model (any module with the same names and shapes)
    # every receiver rank j (a process of its own), with its own copy of the model:
    params = dict(model.named_parameters())

    def apply(batch):           # a list of (name, tensor); the tensors may be views of receive buffers that are
        with torch.no_grad():   # reused for later buckets: copy out what you keep (copy_ does)
            for name, tensor in batch:
                params[name].copy_(tensor)

    recv = Receiver(info_j, expected={n: (tuple(p.shape), str(p.dtype).removeprefix("torch."))
                                      for n, p in params.items()})
    recv.connect()              # join; the trainer's connect() returns once every receiver has joined
    for _ in range(pushes):
        result = recv.receive(apply)   # one push: ReceiveResult(version, bytes, transfer_s, apply_s)
    recv.close()
    results.put((f"receiver {j}", digests(model), result.version))


def run(procs, results, timeout_s: float = 120) -> dict:
    """Start the processes and collect what each puts in ``results`` (who -> the rest); stop at the first that
    fails (its traceback is above) instead of waiting out the timeout."""
    import queue
    import time

    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout_s
    while len(got) < len(procs):
        try:
            r = results.get(timeout=1)
            got[r[0]] = r[1:]
        except queue.Empty:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit("a process failed or timed out (see above)") from None
    for p in procs:
        p.join(timeout=60)
    return got


def main() -> None:
    ctx = mp.get_context("spawn")
    inboxes, results = [ctx.Queue() for _ in range(2)], ctx.Queue()
    procs = [ctx.Process(target=trainer, args=(inboxes, results))] + \
        [ctx.Process(target=receiver, args=(j, inboxes[j], results)) for j in range(2)]
    got = run(procs, results)
    want, _ = got.pop("trainer")
    for who, (have, version) in sorted(got.items()):
        same = have == want
        print(f"sender_receiver: {who}: version {version}, {'bit for bit equal' if same else 'DIFFERENT'}")
        if not same or version != PUSHES:
            raise SystemExit(f"sender_receiver: {who} does not hold the trainer's weights")
    print("sender_receiver: OK: every receiver holds the trainer's weights bit for bit", flush=True)


if __name__ == "__main__":
    main()
