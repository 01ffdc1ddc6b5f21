"""Not on the package's default path: nothing in trainer_sync imports from here.

``tp.py``: TP-aware planning and sending (each receiver gets only its tensor-parallel shard), measured by
benchmarks/bench_multi_gpu.py and tests/pure/test_tp.py but not wired into Sender / WeightSync.
"""
