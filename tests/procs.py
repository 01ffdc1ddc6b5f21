"""The tests' process harness lives in the package (the benchmarks and the demo use it too)."""
from trainer_sync.local_cluster import free_port, outcomes, run_roles  # noqa: F401
