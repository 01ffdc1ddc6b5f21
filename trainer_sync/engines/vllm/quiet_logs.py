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
"""
from __future__ import annotations

import contextlib
import logging

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


RULES = {LAYERWISE: _harmless_reload, RENDERER: _harmless_warmup}


def install() -> None:
    """Idempotent: one filter per logger, however often vLLM calls the plugin."""
    for name, match in RULES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteHarmless) for f in logger.filters):
            logger.addFilter(DemoteHarmless(match))
