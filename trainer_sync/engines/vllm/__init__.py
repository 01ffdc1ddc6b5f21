"""The vLLM side, loaded inside vLLM processes: registration.py (the ``vllm.general_plugins`` entry point, which
registers the backend with vLLM's weight-transfer factory), backend.py (the WeightTransferEngine subclass: join,
receive, finish), failures.py (one failure report per engine), worker.py (putting received tensors into the
worker's model: layerwise reload or the fast path of placement.py), compat.py (every call that differs across vLLM
0.26-0.33), quiet_logs.py. Importing this package imports no vLLM."""
