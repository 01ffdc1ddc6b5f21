"""Each script in examples/ runs as a user runs it (a subprocess, from the checkout, as printed in its docstring) and
ends with its own check: the engine's greedy tokens equal transformers' on the trainer's weights, or every
receiver's checksums equal the trainer's. The test reads that verdict line and the exit status (issue 28)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)

EXAMPLES = {  # script -> (command, the verdict it must print)
    "quickstart": ([sys.executable, "examples/quickstart.py"], "quickstart: OK"),
    "sender_receiver": ([sys.executable, "examples/sender_receiver.py"], "sender_receiver: OK"),
    "delta_slow_link": ([sys.executable, "examples/delta_slow_link.py"], "delta_slow_link: OK"),
    "vllm_serve": ([sys.executable, "examples/vllm_serve.py"], "vllm_serve: OK"),
    "accelerate_loop": ([os.path.join(BIN, "accelerate"), "launch", "--config_file", "recipes/accelerate/cpu.yaml",
                         "examples/accelerate_loop.py"], "accelerate_loop: OK"),
    "trl_callback": ([sys.executable, "examples/trl_callback.py"], "trl_callback: OK"),
    "lora_adapter": ([sys.executable, "examples/lora_adapter.py"], "lora_adapter: OK"),
}


def test_every_example_is_listed():
    assert {p.stem for p in (ROOT / "examples").glob("*.py")} - {"tiny"} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_printed_and_checks_its_result(name, tmp_path):
    if name in ("trl_callback",):
        pytest.importorskip("trl")
    cmd, verdict = EXAMPLES[name]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "PYTHONPATH")}
    env.update(PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path))
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert any(line.startswith(verdict) for line in out.splitlines()), out[-4000:]
