"""The vLLM side: backend.py (the weight-transfer backend and the plugin entry point, loaded inside vLLM processes),
compat.py (every call that differs across vLLM 0.26-0.33), placement.py (the direct apply path on a worker),
quiet_logs.py. Importing this package imports no vLLM."""
