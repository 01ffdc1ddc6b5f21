"""Run trainer ranks (with their own default gloo group) and receivers as local processes.

Used by the tests (through ``tests.helpers.cluster``), the benchmarks and ``recipes/core_demo.py``: each role is a
plain function run in a spawned process, and its return value comes back to the parent. Spawned (not forked) so
every process starts like a real launcher's would.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import time
import socket
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, role, rank, world, dist_port, args, queue):
    # Several processes share this host's cores: one compute thread each avoids oversubscription, which made
    # copies 5x slower in the CPU benchmark.
    torch.set_num_threads(1)
    try:
        if role == "trainer" and world > 1:
            import torch.distributed as dist

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist_port), RANK=str(rank),
                              WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        # torch.save bytes, not tensors: a tensor put on a queue is shared memory that dies with this process.
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)
        queue.put((role, rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        queue.put((role, rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def outcomes(roles: list[tuple[str, int, int, object, tuple]], timeout: float = 120) -> dict:
    """Run roles ``(role, rank, world, fn, args)``, each as ``fn(rank, world, *args)`` in its own process.

    Returns {(role, rank): ("ok", return value) | ("error", traceback text)}; never raises for a role's failure.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    dist_port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, role, rank, world, dist_port, args, queue))
             for role, rank, world, fn, args in roles]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs):
            try:
                role, rank, status, value = queue.get(timeout=0.5)
                out[(role, rank)] = (status, _load(value) if status == "ok" else value)
                continue
            except queue_mod.Empty:
                pass
            if all(not p.is_alive() for p in procs) and queue.empty():
                break  # the rest died without a word (killed): reported below
            if time.monotonic() > deadline:
                raise TimeoutError(f"local cluster: roles still running after {timeout}s: "
                                   f"{[r[:2] for r in roles if r[:2] not in out]}")
        for (role, rank, *_), p in zip(roles, procs):
            out.setdefault((role, rank), ("error", f"process died with exit code {p.exitcode}"))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def run_roles(roles: list[tuple[str, int, int, object, tuple]], timeout: float = 120) -> dict:
    """Like ``outcomes`` but returns {(role, rank): value} and raises if any role failed."""
    out = outcomes(roles, timeout)
    errors = {k: v for k, (status, v) in out.items() if status != "ok"}
    if errors:
        raise AssertionError("\n".join(f"{r}: {e}" for r, e in sorted(errors.items())))
    return {k: v for k, (_, v) in out.items()}
