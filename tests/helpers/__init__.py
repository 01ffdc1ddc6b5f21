"""What the tests share: the process harness (``cluster``, from trainer_sync.testing.local_cluster, which the
benchmarks and recipes use directly), tiny models (``models``), process roles (``*_roles``) and real vLLM engines
(``vllm_engines``, ``fp8_engines``). Imported as ``tests.helpers.<module>``."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout
