"""Demote vLLM log lines that every trainer_sync push or engine start prints and that mean nothing is wrong.

Installed by the plugin's ``register()`` (so in every vLLM process: API server, engine core, workers). Each rule
matches one logger, one message and a known-harmless case, and turns the record into a DEBUG record: it is still
there with ``VLLM_LOGGING_LEVEL=DEBUG``, never dropped, and every other line of these loggers passes untouched.

* ``RotaryEmbedding: Failed to load weights`` (and its variants, ``Llama3RotaryEmbedding``, ...): layerwise reload
  (``finalize_layerwise_reload``) visits every module; rotary embeddings hold only a ``cos_sin_cache`` buffer that
  vLLM computes itself and no checkpoint has, so they never receive anything, and vLLM puts the buffer back.
* ``ParallelLMHead: Failed to load weights``: a tied LM head (``tie_word_embeddings``, e.g. Qwen3-0.6B) is the
  embedding's weight and receives through ``embed_tokens``. An untied head cannot get here through trainer_sync:
  ``lm_head.weight`` is then a checkpoint name, and a push that lacks it is refused at the handshake
  (``HandshakeMismatch``) before any byte moves.
* any ``Failed to load weights`` while a push that updates some modules only is finalized (a LoRA trainer's merged
  push after its first, ``partial_push()``): the layers it does not carry keep their weights, as meant.
* ``Chat template warmup failed`` with ``skip_tokenizer_init=True``: vLLM warms up chat rendering at start-up and,
  having no tokenizer, fails; prompts given as token ids never need one. With a tokenizer the warning stays.
* a push refused at the handshake (a wrong model: nothing was sent, the engine serves on): vLLM logs the refusal
  as an exception with its traceback in every process it crosses (the worker, the engine core, ``vllm serve``'s
  exception handler and uvicorn), ~150 ERROR lines that bury the one reason, which the trainer raises anyway and
  the engine's last worker logs as ONE warning (failures.py). Recognised by the error's typed frame (kind
  ``refused``, protocol/error_frame.py), never by its wording; and right after such a refusal, the
  ``finish_weight_update called without a matching start_weight_update`` of the trainer closing the other
  workers' sessions (vLLM already closed the refusing worker's): expected then, misleading in the log.
"""
from __future__ import annotations

import contextlib
import logging
import time

from ...protocol.error_frame import unframe
from ...protocol.messages import ErrorKind
from ...protocol.wire import ProtocolError

LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
RENDERER = "vllm.renderers.base"


_PARTIAL = [False]  # a partial push is being finalized in this process (partial_push)


@contextlib.contextmanager
def partial_push(on: bool = True):
    """Around the finalize of a push that carries some modules only: their siblings' warnings are expected."""
    before, _PARTIAL[0] = _PARTIAL[0], bool(on)
    try:
        yield
    finally:
        _PARTIAL[0] = before


def _harmless_reload(record: logging.LogRecord) -> bool:
    if record.msg != "%s: Failed to load weights" or not record.args:
        return False
    if _PARTIAL[0]:
        return True
    layer = str(record.args[0])
    return layer.endswith("RotaryEmbedding") or layer == "ParallelLMHead"


def _harmless_warmup(record: logging.LogRecord) -> bool:
    if record.msg != "Chat template warmup failed":
        return False
    error = record.exc_info[1] if record.exc_info else None
    return error is not None and "skip_tokenizer_init" in str(error)


class DemoteHarmless(logging.Filter):
    """A logger filter: records that ``match`` become DEBUG (the handlers, at INFO by default, then drop them)."""

    def __init__(self, match):
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self.match(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_REFUSED_AT = [float("-inf")]  # when this process last demoted a refusal's records (monotonic seconds)
# vLLM's words, not ours: the one text match left on purpose (see the module docstring)
NO_SESSION = "finish_weight_update called without a matching start_weight_update"
AFTER_REFUSAL_S = 60.0


def _texts(record: logging.LogRecord) -> list[str]:
    out = [record.getMessage()]
    error = record.exc_info[1] if record.exc_info else None
    seen = set()
    while error is not None and id(error) not in seen:  # the exception and what caused it
        seen.add(id(error))
        out.append(str(error))
        error = error.__cause__ or error.__context__
    return out


def _refusal_noise(record: logging.LogRecord) -> bool:
    texts = _texts(record)
    for text in texts:
        try:
            _, info = unframe(text)
        except ProtocolError:
            continue
        if info is not None and info.kind == ErrorKind.REFUSED:
            _REFUSED_AT[0] = time.monotonic()
            return True
    return time.monotonic() - _REFUSED_AT[0] < AFTER_REFUSAL_S and any(NO_SESSION in t for t in texts)


# The loggers a refused push's exception passes through, process by process.
REFUSAL_LOGGERS = ("vllm.v1.executor.multiproc_executor", "vllm.v1.engine.core",
                   "vllm.entrypoints.serve.exception_handling.handlers.exception",
                   "vllm.entrypoints.serve.exception_handling.handlers.vllm_error", "uvicorn.error")

RULES = {LAYERWISE: _harmless_reload, RENDERER: _harmless_warmup, **dict.fromkeys(REFUSAL_LOGGERS, _refusal_noise)}


def install() -> None:
    """Idempotent: one filter per logger, however often vLLM calls the plugin."""
    for name, match in RULES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteHarmless) for f in logger.filters):
            logger.addFilter(DemoteHarmless(match))
