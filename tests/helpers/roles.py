"""Process bodies for the core data-path tests (importable by spawned children)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.protocol.messages import JoinInfo


def info(port, j, n, m, token="tok", epoch=0, timeout=20.0):
    return JoinInfo("127.0.0.1", port, token, epoch, m, n, j, "gloo", timeout)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 8))


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def receive_pushes(r: Receiver, pushes: int, field: str = "version") -> list:
    """Connect ``r``, take ``pushes`` pushes, close it; return (the ReceiveResult's ``field``, tensors) per push."""
    r.connect()
    out = []
    try:
        for _ in range(pushes):
            got = {}
            res = r.receive(lambda batch: got.update({k: v.clone() for k, v in batch}))
            out.append((getattr(res, field), got))
    finally:
        r.close()
    return out


def collect_receiver(j, n, m, port, pushes, expected=None, token="tok", timeout=20.0):
    """Receive ``pushes`` pushes; return the tensors received in each (cloned) and each receive's version."""
    return receive_pushes(Receiver(info(port, j, n, m, token, timeout=timeout), expected=expected), pushes)


# ---- trainers -----------------------------------------------------------------------------------------------

def plain_trainer(rank, world, n, port, pushes, bucket_mb=0.004):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port, token="tok", bucket_mb=bucket_mb, timeout_s=20))
    sender.connect(n)
    states, reports = train_and_push(sender, model, opt, pushes)
    sender.close()
    return states, reports


def train_and_push(sender, model, opt, pushes):
    """``pushes`` times: a training step, a push; returns the full weights and the report after each."""
    states, reports = [], []
    for i in range(pushes):
        train_step(model, opt, i)
        reports.append(sender.push().to_dict())
        states.append(full_state(model))
    return states, reports


def fsdp_trainer(rank, world, n, port, pushes):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=20))
    assert type(sender.source).__name__ == "FsdpSource"
    sender.connect(n)
    states, reports = train_and_push(sender, model, opt, pushes)
    # No rank may ever hold the full tensor during a push: each sends exactly its local shard's bytes.
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    for report in reports:
        report["local_bytes"] = local
    sender.close()
    return states, reports


def zero3_engine(model, opt=None):
    """``model`` under DeepSpeed ZeRO-3 on CPU (gloo) with an SGD optimizer (or ``opt(params)``); returns the
    engine."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if opt is None else opt(model.parameters())
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def zero3_trainer(rank, world, n, port, pushes):
    import deepspeed

    engine = zero3_engine(mlp())
    sender = Sender(engine, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=30))
    assert type(sender.source).__name__ == "DeepSpeedSource"
    sender.connect(n)
    states, reports = [], []
    for i in range(pushes):
        g = torch.Generator().manual_seed(i)
        loss = engine(torch.randn(8, 16, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        reports.append(sender.push().to_dict())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            states.append({k: p.detach().clone() for k, p in engine.module.named_parameters()})
    sender.close()
    return states, reports


# ---- edge cases and failures ------------------------------------------------------------------------------------

class Odd(torch.nn.Module):
    """Every awkward tensor at once: empty, odd sizes, fp16/bf16, integer, non-contiguous, a tied pair."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.empty = torch.nn.Parameter(torch.empty(0, 4))
        self.odd = torch.nn.Parameter(torch.randn(3, 7).half())
        self.bf = torch.nn.Parameter(torch.randn(13).bfloat16())
        self.ints = torch.nn.Parameter(torch.arange(5, dtype=torch.int32), requires_grad=False)
        self.strided = torch.nn.Parameter(torch.randn(9, 5).t())  # non-contiguous
        self.big = torch.nn.Parameter(torch.randn(3000))  # larger than a bucket
        self.embed = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied


def odd_trainer(rank, world, n, port, cfg_kwargs=None):
    model = Odd()
    assert not model.strided.is_contiguous()
    sender = Sender(model, SyncConfig(**{"port": port, "token": "tok", "bucket_mb": 0.005, "timeout_s": 20,
                                         **(cfg_kwargs or {})}))
    sender.connect(n)
    report = sender.push()
    sender.close()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, report.to_dict()


def refusing_receiver(j, n, m, port, expected, token="tok"):
    """A receiver whose expectations do not match; returns (error text, whether anything was applied)."""
    from trainer_sync import HandshakeMismatch

    r = Receiver(info(port, j, n, m, token), expected=expected)
    r.connect()
    applied = []
    try:
        r.receive(lambda batch: applied.extend(batch))
    except HandshakeMismatch as e:
        return str(e), len(applied)
    finally:
        r.close()
    return None, len(applied)


def mismatched_trainer(rank, world, n, port):
    from trainer_sync import HandshakeMismatch

    sender = Sender(mlp(), SyncConfig(port=port if rank == 0 else 0, token="tok", timeout_s=20))
    sender.connect(n)
    try:
        sender.push()
    except HandshakeMismatch as e:
        return e.mismatches
    finally:
        sender.close()
    return None


def connect_only_trainer(rank, world, n, port, token="tok", timeout=20.0):
    """Connect and report how it ended: ("ok", "") or (exception type, message)."""
    sender = Sender(mlp(), SyncConfig(port=port, token=token, timeout_s=timeout))
    try:
        sender.connect(n)
        sender.push()
        return "ok", ""
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    finally:
        sender.close()


def connect_only_receiver(j, n, m, port, token="tok", timeout=20.0):
    r = Receiver(info(port, j, n, m, token, timeout=timeout))
    try:
        r.connect()
        r.receive(lambda batch: None)
        return "ok", ""
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    finally:
        r.close()


def epochs_trainer(rank, world, n, port, epochs):
    model = mlp()
    sender = Sender(model, SyncConfig(port=port, token="tok", timeout_s=20))
    versions = []
    for e in range(epochs):
        sender.connect(n)  # a new bridging group each time (new membership)
        with torch.no_grad():
            model[0].bias.fill_(float(e))
        versions.append(sender.push().version)
        sender.close_group()
    sender.close()
    return versions


def epochs_receiver(j, n, m, port, epochs):
    biases = []
    for e in range(epochs):
        r = Receiver(info(port, j, n, m, epoch=e))
        r.connect()
        got = {}
        r.receive(lambda batch: got.update({k: v.clone() for k, v in batch}))
        biases.append(float(got["0.bias"][0]))
        r.close()
    return biases


# ---- faults (caused for real: processes are killed, peers stall) -------------------------------------------------

def proc_usage() -> dict:
    import psutil

    me = psutil.Process()
    return {"rss": me.memory_info().rss, "fds": me.num_fds(), "threads": me.num_threads()}


def fault_trainer(rank, world, n, port, cfg_kwargs):
    """Push once; return how it ended and how long it took."""
    import time

    model = mlp()
    sender = Sender(model, SyncConfig(**{"port": port, "token": "tok", "bucket_mb": 0.002, "timeout_s": 20,
                                         **cfg_kwargs}))
    sender.connect(n)
    t = time.monotonic()
    try:
        sender.push()
        return "ok", "", time.monotonic() - t
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e), time.monotonic() - t
    finally:
        sender.close()


def fault_receiver(j, n, m, port, fault, timeout=20.0):
    """A receiver that dies (SIGKILL) or stalls on its first batch when ``fault`` says so; else a normal one."""
    import signal
    import time

    r = Receiver(info(port, j, n, m, timeout=timeout))
    r.connect()
    applied = []

    def on_batch(batch):
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "stall":
            time.sleep(12)
        if fault == "slow":
            time.sleep(0.3)
        applied.extend(name for name, _ in batch)

    t = time.monotonic()
    try:
        r.receive(on_batch)
        return "ok", "", time.monotonic() - t
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e), time.monotonic() - t
    finally:
        r.close()


class DyingSource:
    """Wraps a real source; the trainer process SIGKILLs itself while packing its third slot (mid-push)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def flat(self, name):
        import signal

        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.flat(name)


def dying_trainer(rank, world, n, port):
    from trainer_sync.sources import ModuleSource

    sender = Sender(ModuleSource(mlp()), SyncConfig(port=port, token="tok", bucket_mb=0.002, timeout_s=20))
    sender.source = DyingSource(sender.source)
    sender.connect(n)
    sender.push()
    return "unreachable"


def nan_trainer(rank, world, n, port):
    from trainer_sync import HandshakeMismatch

    model = mlp()
    if rank == 1:
        with torch.no_grad():
            model[2].weight[3, 4] = float("nan")
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", timeout_s=20, check_finite=True))
    sender.connect(n)
    try:
        sender.push()
        return None
    except HandshakeMismatch as e:
        return e.mismatches
    finally:
        sender.close()


def version_trainer(rank, world, n, port):
    sender = Sender(mlp(), SyncConfig(port=port, token="tok", timeout_s=20))
    sender.connect(n)
    first = sender.push(version=5).version
    try:
        sender.push(version=5)
        stale = None
    except ValueError as e:
        stale = str(e)
    second = sender.push().version
    sender.close()
    return first, stale, second


def load_trainer(rank, world, n, port, pushes, warmup):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=30))
    sender.connect(n)
    usage = {}
    for i in range(pushes):
        train_step(model, opt, i)
        sender.push()
        if i + 1 in (warmup, pushes):
            usage[i + 1] = proc_usage()
    state = full_state(model)
    sender.close()
    return usage, state


def load_receiver(j, n, m, port, pushes, warmup):
    r = Receiver(info(port, j, n, m, timeout=30))
    r.connect()
    usage, got = {}, {}
    for i in range(pushes):
        r.receive(lambda batch: got.update({k: v.clone() for k, v in batch}))
        if i + 1 in (warmup, pushes):
            usage[i + 1] = proc_usage()
    r.close()
    return usage, got


# ---- dynamic clusters: catch-up ---------------------------------------------------------------------------------

def catchup_trainer(rank, world, n, port, pushes, extra_pushes_during_join=0):
    """Push ``pushes`` times (training between) keeping the latest version; then serve a joiner while training."""
    import time

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sender = Sender(model, SyncConfig(port=port if rank == 0 else 0, token="tok", bucket_mb=0.002, timeout_s=30,
                                      keep_latest=True))
    sender.connect(n)
    for i in range(pushes):
        train_step(model, opt, i)
        sender.push()
    state = full_state(model)
    store = sender.rdzv.store
    store.set(f"test/pushed/{rank}", "1")
    # keep training (no push) until the joiner is done: the join must not need this loop
    steps = 0
    while not store.check(["test/joined"]):
        steps += 1
        time.sleep(0.01)
    served = list(sender.catchup.served)
    sender.close()
    # rank 0 owns the store (this frame's reference keeps it up after close): it leaves only after every rank has
    # closed, so no rank's last store call races the server going away
    store.set(f"test/closed/{rank}", "1")
    if rank == 0:
        store.wait([f"test/closed/{r}" for r in range(world)])
    return state, served, steps


def joiner(j, n, m, port, expected=None):
    from trainer_sync.rank.catchup import pull_latest
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    store.wait([f"test/pushed/{r}" for r in range(m)])
    got = {}
    try:
        version = pull_latest("127.0.0.1", port, "tok", m, lambda b: got.update({k: v.clone() for k, v in b}),
                              expected=expected, timeout_s=30)
    finally:
        store.set("test/joined", "1")
    return version, got
