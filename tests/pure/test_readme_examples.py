"""Every Python block of the README is a verbatim excerpt of a script that runs (issue 28): ``examples/`` (each run
by tests/processes/test_examples.py) or ``recipes/`` (run by tests/processes/test_integrations.py), so the README
can never show code that does not run as printed."""
from __future__ import annotations

import re
import textwrap

from tests.helpers import ROOT


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```\n", text, re.S)


def _is_excerpt(block: str, lines: list[str]) -> bool:
    want = textwrap.dedent(block).rstrip("\n").splitlines()
    n = len(want)
    return any(textwrap.dedent("\n".join(lines[i:i + n])).splitlines() == want for i in range(len(lines) - n + 1))


def test_every_readme_python_block_is_an_excerpt_of_a_script():
    sources = {str(p.relative_to(ROOT)): p.read_text().splitlines()
               for folder in ("examples", "recipes") for p in sorted((ROOT / folder).glob("*.py"))}
    blocks = _blocks()
    assert len(blocks) >= 8, len(blocks)
    orphans = [b.splitlines()[0] for b in blocks if not any(_is_excerpt(b, lines) for lines in sources.values())]
    assert not orphans, f"README blocks that no examples/ or recipes/ script contains verbatim: {orphans}"


def test_the_excerpt_check_can_fail():
    lines = ["def f():", "    x = 1", "    return x"]
    assert _is_excerpt("x = 1\nreturn x\n", lines)
    assert not _is_excerpt("x = 2\nreturn x\n", lines) and not _is_excerpt("return x\nx = 1\n", lines)
