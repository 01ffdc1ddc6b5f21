"""`trainer-sync` command line: demo and bench."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trainer-sync")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the main demo")
    sub.add_parser("bench", help="run the CPU benchmark")
    args, rest = ap.parse_known_args(argv)
    script = {"demo": ROOT / "recipes" / "core_demo.py", "bench": ROOT / "benchmarks" / "bench_core.py"}[args.cmd]
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
