"""The plugin's log filter (trainer_sync/engines/quiet_logs.py): the known-harmless vLLM warnings become DEBUG, every
other record of those loggers passes as it was. Real ``logging`` records on vLLM's own logger names; no vLLM needed
(the end-to-end check that a real engine's pushes stay quiet is
tests/processes/test_integrations.py::test_trl_recipe_end_to_end).
"""
from __future__ import annotations

import logging

import pytest

from trainer_sync.engines.vllm import quiet_logs


@pytest.fixture
def captured():
    quiet_logs.install()
    quiet_logs.install()  # idempotent: vLLM calls the plugin more than once per process
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.INFO)
    loggers = [logging.getLogger(n) for n in quiet_logs.RULES]
    for lg in loggers:
        assert sum(isinstance(f, quiet_logs.DemoteHarmless) for f in lg.filters) == 1
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield records, loggers
    for lg in loggers:
        lg.removeHandler(handler)
        lg.setLevel(logging.NOTSET)


def _warmup_failure(lg, error):
    try:
        raise error
    except ValueError:
        lg.warning("Chat template warmup failed", exc_info=True)


def test_harmless_lines_are_quiet_and_the_rest_passes(captured):
    records, (layerwise, renderer, *_) = captured
    for layer in ("RotaryEmbedding", "Llama3RotaryEmbedding", "ParallelLMHead"):
        layerwise.warning("%s: Failed to load weights", layer)
    _warmup_failure(renderer, ValueError("Tokenizer not available when `skip_tokenizer_init=True`"))
    assert records == []
    layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")  # a layer that should have received
    layerwise.info("%s: Delayed processing", "RotaryEmbedding")
    _warmup_failure(renderer, ValueError("jinja2 syntax error in the chat template"))  # a real template problem
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "QKVParallelLinear: Failed to load weights"), ("INFO", "RotaryEmbedding: Delayed processing"),
        ("WARNING", "Chat template warmup failed")]
    assert records[-1].exc_info is not None


def test_demoted_lines_show_at_debug(captured):
    records, (layerwise, *_) = captured
    layerwise.setLevel(logging.DEBUG)
    records.clear()
    for h in layerwise.handlers:
        h.setLevel(logging.DEBUG)
    layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")
    assert [(r.levelname, r.getMessage()) for r in records] == [("DEBUG", "RotaryEmbedding: Failed to load weights")]


def _logged_exception(lg, error, msg="Invocation of %s method failed", *args):
    try:
        try:
            raise error
        except Exception as e:
            raise RuntimeError(f"Call to update_weights method failed: {e}") from e
    except RuntimeError:
        lg.exception(msg, *(args or ("update_weights",)))


def test_a_refusal_and_the_session_close_after_it_are_demoted_other_failures_pass(captured, monkeypatch):
    from trainer_sync.protocol.error_frame import FramedError
    from trainer_sync.protocol.messages import ErrorInfo, ErrorKind

    records, _ = captured
    core = logging.getLogger("vllm.v1.engine.core")
    monkeypatch.setattr(quiet_logs, "_REFUSED_AT", [float("-inf")])
    # before any refusal, vLLM's session error is an error like any other
    core.error("Call failed: RuntimeError: %s.", quiet_logs.NO_SESSION)
    _logged_exception(core, FramedError(ErrorInfo(ErrorKind.FAILED, "trainer_sync: apply failed")))
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    _logged_exception(core, FramedError(ErrorInfo(ErrorKind.REFUSED, "trainer_sync handshake failed")))
    core.error("Call failed: RuntimeError: %s.", quiet_logs.NO_SESSION)  # the trainer closing the sessions after it
    assert len(records) == 2  # both DEBUG now, below the handler's INFO
    monkeypatch.setattr(quiet_logs, "_REFUSED_AT", [quiet_logs._REFUSED_AT[0] - quiet_logs.AFTER_REFUSAL_S - 1])
    core.error("Call failed: RuntimeError: %s.", quiet_logs.NO_SESSION)  # long after: an error again
    assert len(records) == 3 and records[-1].levelno == logging.ERROR
