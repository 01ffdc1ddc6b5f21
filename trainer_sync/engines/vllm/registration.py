"""The ``vllm.general_plugins`` entry point: makes the weight-transfer backend ``trainer_sync`` known to vLLM.

``pip install trainer_sync`` is all an engine needs: setup.cfg declares ``vllm.general_plugins: trainer_sync =
trainer_sync.engines.vllm.registration:register``; vLLM calls ``register()`` in every process it starts (API server,
engine core, workers), and then ``vllm serve M --weight-transfer-config '{"backend": "trainer_sync"}'`` or
``LLM(model=M, weight_transfer_config={"backend": "trainer_sync"})`` builds backend.py's class on every worker.

Registration goes through vLLM's public factory, ``WeightTransferEngineFactory.register_engine(name, module, class)``
(the same call vLLM makes for its own ``nccl`` and ``ipc`` backends; its signature is the same from 0.26 to 0.33),
with the lazy module-path form: nothing of backend.py (nor torch.distributed groups, codecs...) is imported in
processes that never build a backend, such as the API server.
"""
from __future__ import annotations

import logging

BACKEND = "trainer_sync"
BACKEND_MODULE = "trainer_sync.engines.vllm.backend"
BACKEND_CLASS = "TrainerSyncWeightTransferEngine"

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group. vLLM may call it several times per process: idempotent."""
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from .quiet_logs import install
    install()  # known-harmless vLLM warnings of every push / start-up become DEBUG (see quiet_logs.py)
    follow_vllm_level()
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, BACKEND_MODULE, BACKEND_CLASS)
    except ValueError:
        # The factory refuses a name it already holds: this process registered it before (a plugin loaded twice,
        # or a test that called register() itself), so there is nothing left to do.
        logger.debug("trainer_sync: the weight-transfer backend %r was already registered", BACKEND)
    _registered = True


def follow_vllm_level() -> None:
    """In vLLM's processes, trainer_sync logs at vLLM's level (``VLLM_LOGGING_LEVEL``) unless someone set its own.

    Without a level of its own, the ``trainer_sync`` logger takes the root logger's, which the host process may
    have set anywhere: vLLM 0.26's API server imports ``model_hosting_container_standards``, which sets the root
    logger to ERROR (its ``LOG_LEVEL`` default), and the worker processes it forks inherit that, so the backend's
    one warning for a refused push was never printed."""
    ours = logging.getLogger("trainer_sync")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.getLogger("vllm").getEffectiveLevel())
