"""One failure report per engine: every worker of a vLLM engine agrees on what failed, and only the last one raises.

Why a module of its own: the rule is about vLLM's executors, not about joining or applying weights. vLLM 0.32's
multiprocess executor reads the workers' replies in rank order and stops at the first failure, leaving the other
workers' replies queued: every later RPC to that engine then gets the previous call's reply. So the workers first
agree (over vLLM's own CPU groups) on what failed, and only the last worker, whose reply is read last, raises,
naming every failed worker; a refused push (every worker refused the same plan) is logged by it as one warning.
The backend (backend.py) calls ``report`` after a join and after every update.
"""
from __future__ import annotations

import dataclasses
import logging

from ...errors import UNTOUCHED, HandshakeMismatch
from ...protocol.error_frame import FramedError
from ...protocol.messages import ErrorInfo, ErrorKind

logger = logging.getLogger(__name__)


def report(pc, error: BaseException | None, touched: bool | None = None, served_version: int | None = None) -> bool:
    """Raise ``error`` (or a sibling worker's) from exactly one worker of this engine: the last one. ``pc``: the
    worker's vLLM parallel config (its ``rank`` and ``world_size`` in the engine); ``served_version``: what the
    engine serves (the backend's last whole push, None: the weights it loaded), named when it refuses a push.

    ``touched`` (an update): whether this worker applied any weight of it. The error raised is a FramedError:
    its ``ErrorInfo`` travels through vLLM's RPC (which passes on text alone) to the trainer's engine client, and
    its kind is ``untouched`` when no worker of the engine applied any weight, telling the trainer that the engine
    still serves its old weights whole (the message then ends with ``UNTOUCHED`` for people). Returns whether
    every worker succeeded (on the workers that do not raise).
    """
    mine = None if error is None else ErrorInfo.of(error, f"{type(error).__name__}: {error}")
    failures = {pc.rank: mine} if mine else {}
    any_touched = bool(touched)
    if pc.world_size > 1:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        items = [(pc.rank, mine, bool(touched))]
        for group in (get_tp_group(), get_pp_group()):  # TP x PP = every worker of this engine
            if group.world_size > 1:
                gathered: list = [None] * group.world_size
                dist.all_gather_object(gathered, items, group=group.cpu_group)
                items = [item for part in gathered for item in part]
        failures = {r: m for r, m, _ in items if m}
        any_touched = any(t for _, _, t in items)
    if not failures:
        return True
    refused = isinstance(error, HandshakeMismatch)
    if pc.rank != pc.world_size - 1:
        # a refusal: every worker refused the same plan, and the last one says it once
        logger.log(logging.DEBUG if refused else logging.ERROR, "trainer_sync: worker %d failed (reported by "
                   "the engine's last worker): %s", pc.rank, mine.message if mine else None)
        return False
    if refused and all(m == mine for m in failures.values()):
        # one line per engine; vLLM's tracebacks of it are demoted to DEBUG (quiet_logs.py)
        serving = "the weights it loaded" if served_version is None else f"version {served_version}"
        logger.warning("trainer_sync: refused a push before any byte moved; still serving %s: %s", serving,
                       "; ".join(line.strip() for line in error.mismatches))
    untouched = touched is not None and not any_touched and not isinstance(error, HandshakeMismatch)
    if error is not None and (len(failures) == 1 or all(m == mine for m in failures.values())):
        # One failure, or the same everywhere (a refused handshake: every worker checks the same plan).
        if untouched:
            raise FramedError(dataclasses.replace(mine, kind=ErrorKind.UNTOUCHED,
                                                  message=f"{mine.message} {UNTOUCHED}")) from error
        raise FramedError(ErrorInfo.of(error, str(error))) from error
    lines = "\n  ".join(f"worker {r}: {m.message}" for r, m in sorted(failures.items()))
    raise FramedError(ErrorInfo(ErrorKind.UNTOUCHED if untouched else ErrorKind.FAILED,
                                f"trainer_sync: {len(failures)} of {pc.world_size} workers failed:\n  {lines}" +
                                (f"\n{UNTOUCHED}" if untouched else ""), stage="apply"))
