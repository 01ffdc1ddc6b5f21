"""The commands outside the test suite run on the package alone: `trainer-sync bench` (the CPU benchmark, as
``python -m benchmarks.bench_core`` in the checkout) and ``recipes/core_demo.py`` as a script, both started from a
folder that is not the checkout; neither the package, the benchmarks nor the recipes import tests/."""
import ast
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _run(cmd, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the package of this checkout, as the editable install points at it
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_bench_runs_the_benchmark_module(tmp_path):
    out, err = _run([sys.executable, "-m", "trainer_sync.cli", "bench", "--tensors", "8", "--mb", "1", "--iters",
                     "1"], tmp_path)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["results"] and all(r["trainer_sync_s"] > 0 for r in res["results"]), res
    # beside the JSON line, a short table for people on stderr, with the same figures
    table = err[err.index("result:"):]
    assert f"results[1].trainer_sync_s {res['results'][1]['trainer_sync_s']:.4g}" in " ".join(table.split()), table


@pytest.mark.slow
def test_core_demo_recipe_is_bit_exact(tmp_path):
    out, _ = _run([sys.executable, str(ROOT / "recipes" / "core_demo.py"), "--pushes", "2", "--mb", "1"], tmp_path)
    assert "bit" in out.lower(), out


def test_package_benchmarks_and_recipes_do_not_import_tests():
    """Only bench_ipc_gpu's ``--device cpu`` logic check borrows the tests' CPU stand-in for CUDA IPC."""
    allowed = {("benchmarks/bench_ipc_gpu.py", "tests.helpers")}
    found = set()
    for folder in ("trainer_sync", "benchmarks", "recipes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                found |= {(str(path.relative_to(ROOT)), n) for n in names if n.split(".")[0] == "tests"}
    assert found == allowed, found


def _cli(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "trainer_sync.cli", *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, says", [
    (["demo", "--steps", "-3"], "--steps must be at least 1, got -3"),
    (["demo", "--trl", "--group", "1"], "--group must be at least 2"),
    (["demo", "--engine-url", "localhost"], "--engine-url must look like http://HOST:PORT"),
    (["bench", "--iters", "0"], "--iters must be positive"),
])
def test_cli_refuses_bad_options_once_with_exit_2_before_anything_starts(args, says, tmp_path):
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count(says) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "demo:" not in proc.stdout  # the demo's banner: nothing was launched


def test_cli_names_an_engine_url_where_nothing_answers_once(tmp_path):
    from tests.helpers.cluster import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc = _cli(["demo", "--engine-url", url], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count(url) == 1, proc.stderr
    assert "nothing answers there" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_help_describes_every_command_with_defaults(tmp_path):
    top, bench, demo = (_cli(a, tmp_path) for a in (["--help"], ["bench", "--help"], ["demo", "--help"]))
    for p in (bench, demo):
        p.stdout = " ".join(p.stdout.split())  # argparse wraps lines
    assert all(p.returncode == 0 for p in (top, bench, demo)), (top.stderr, bench.stderr, demo.stderr)
    assert "demo" in top.stdout and "bench" in top.stdout
    assert "--iters" in bench.stdout and "(default: 3)" in bench.stdout, bench.stdout
    assert "--steps" in demo.stdout and "(default: 40)" in demo.stdout, demo.stdout


@pytest.mark.slow
def test_every_benchmark_has_help_with_a_description_and_defaults(tmp_path):
    """``python -m benchmarks.X --help`` for every benchmark: its docstring, and each option that takes a value
    shows its default (issue 28)."""
    import re

    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                   if "__main__" in p.read_text() and p.stem != "__init__")
    assert len(names) >= 10, names
    for name in names:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=str(ROOT), env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        text = proc.stdout
        first = ast.get_docstring(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())).split("\n")[0]
        assert " ".join(first.split()) in " ".join(text.split()), (name, first)
        options = text[text.index("options:"):]
        valued = re.findall(r"^  (?:-\w, )?(--[\w-]+) [A-Z_]+", options, re.M)
        assert " ".join(options.split()).count("(default:") >= len(valued), (name, options)
