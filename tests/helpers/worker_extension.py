"""A vLLM worker extension (``worker_extension_cls``, public in every release since 0.26) for the tests' engines:
one worker method that answers which version the trainer_sync backend of that worker last applied.

vLLM 0.26 keeps no weight version (no ``LLM.get_weight_version()``, no ``GET /weight_info``), so a test asks the
backend itself: ``llm.collective_rpc(METHOD)`` in process, ``POST /collective_rpc {"method": METHOD}`` on a
``vllm serve`` (dev mode). It adds a method and changes nothing else; ``tests.helpers.vllm_engines.served_version``
is the one caller.
"""
from __future__ import annotations

METHOD = "trainer_sync_served_version"
PATH = "tests.helpers.worker_extension.ServedVersionExtension"


class ServedVersionExtension:
    """Mixed into vLLM's worker class by vLLM itself; ``self`` is the worker."""

    def trainer_sync_served_version(self) -> int | None:
        return self.weight_transfer_engine.served_version
