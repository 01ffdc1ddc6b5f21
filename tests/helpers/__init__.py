"""What the tests share: the process harness (``cluster``), tiny models (``models``), process roles (``*_roles``) and
real vLLM engines (``vllm_engines``, ``fp8_engines``). Imported as ``tests.helpers.<module>``; the benchmarks use the
harness too."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout
