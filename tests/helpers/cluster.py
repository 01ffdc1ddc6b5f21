"""The process harness of the tests: trainer_sync.testing.local_cluster (in the package, so that the benchmarks and
recipes use it without importing tests/)."""
from trainer_sync.testing.local_cluster import free_port, outcomes, run_roles

__all__ = ["free_port", "outcomes", "run_roles"]
