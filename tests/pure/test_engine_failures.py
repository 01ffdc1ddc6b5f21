"""engines/vllm/failures.py on one worker (no vLLM groups needed): success passes, a failure is raised as a typed
FramedError (kind untouched when no weight was applied, refused for a refused plan), and a refusal is logged once
naming what the engine still serves."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from trainer_sync.engines.vllm import failures
from trainer_sync.errors import UNTOUCHED, HandshakeMismatch
from trainer_sync.protocol.error_frame import FramedError
from trainer_sync.protocol.messages import ErrorKind

ONE = SimpleNamespace(rank=0, world_size=1)


def test_success_and_a_failure_before_any_weight():
    assert failures.report(ONE, None) is True
    with pytest.raises(FramedError) as err:
        failures.report(ONE, RuntimeError("boom"), touched=False)
    assert err.value.info.kind == ErrorKind.UNTOUCHED and err.value.info.message == f"RuntimeError: boom {UNTOUCHED}"
    with pytest.raises(FramedError) as err:
        failures.report(ONE, RuntimeError("boom"), touched=True)
    assert err.value.info.kind == ErrorKind.FAILED


def test_a_refusal_is_raised_typed_and_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger=failures.__name__), pytest.raises(FramedError) as err:
        failures.report(ONE, HandshakeMismatch(["receiver 0: missing w"]), touched=False, served_version=3)
    assert err.value.info.kind == ErrorKind.REFUSED
    [line] = [r.getMessage() for r in caplog.records]
    assert "refused a push before any byte moved; still serving version 3: receiver 0: missing w" in line
