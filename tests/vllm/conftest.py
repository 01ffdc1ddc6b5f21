"""The engines of the vLLM tests. Each fixture is module-scoped: a module's tests share one engine (engines are the
slow part), and the next module starts from a fresh checkpoint and fresh engines, so modules never depend on each
other's pushes. Nothing here imports vLLM at collection time (tests/helpers/vllm_engines.py imports it lazily; each
module skips itself with ``pytest.importorskip("vllm")``)."""
from __future__ import annotations

import pytest

from tests.helpers.lora import LORA_ENGINE
from tests.helpers.models import save_model
from tests.helpers.vllm_engines import in_process_llm, running_server


def _module(request) -> str:
    return request.module.__name__.rsplit(".", 1)[-1]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> str:
    """The tiny fp32 Qwen3 checkpoint (seed 0, tests/helpers/models.py) that this module's engines load."""
    return save_model(str(tmp_path_factory.mktemp(f"tiny-qwen3-{_module(request)}")))


@pytest.fixture(scope="module")
def llm(model_dir):
    """An in-process ``vllm.LLM`` on ``model_dir`` (no worker process: starts in seconds)."""
    with in_process_llm(model_dir) as engine:
        yield engine


@pytest.fixture(scope="module")
def lora_llm(model_dir):
    """An in-process ``vllm.LLM`` on ``model_dir`` with LoRA on (tests/helpers/lora.py LORA_ENGINE)."""
    with in_process_llm(model_dir, **LORA_ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(request, model_dir, tmp_path_factory):
    """``vllm serve`` on ``model_dir`` with two TP workers (two receivers behind one HTTP engine)."""
    with running_server(model_dir, tmp_path_factory, f"serve-{_module(request)}", tensor_parallel_size=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_worker_server(request, model_dir, tmp_path_factory):
    """``vllm serve`` on ``model_dir`` with one worker (a second engine beside the in-process one)."""
    with running_server(model_dir, tmp_path_factory, f"serve-one-worker-{_module(request)}") as srv:
        yield srv
