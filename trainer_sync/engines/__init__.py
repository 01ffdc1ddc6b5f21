"""Inference-engine side of trainer_sync.

``vllm/`` is the vLLM side (the weight-transfer backend, loaded inside vLLM processes through the
``vllm.general_plugins`` entry point, and its version shims); ``clients.py`` is how the trainer drives engines
(in-process ``vllm.LLM`` or ``vllm serve`` over HTTP);
``checkpoint.py`` reads what a served checkpoint holds, so the handshake can refuse a mismatched trainer model.
Nothing here is imported by ``import trainer_sync``: a trainer without vLLM installed never loads it.
"""
