"""Tiny causal LMs built from a transformers config, for tests that need a real model (nothing is downloaded).

Why these sizes: head_dim 32 is the smallest head size vLLM's CPU attention supports; hidden 64, 2 layers and a
256-token vocabulary keep an engine start and a forward pass at a few milliseconds. The embedding is tied to the
LM head (like Qwen3-0.6B) so every sync test also covers tied weights. A larger init scale than transformers'
default spreads the logits, so greedy tokens do not hinge on float32 rounding differences between HF's and vLLM's
kernels.
"""
from __future__ import annotations

import os

import torch

VOCAB = 256


def tiny_config(kind: str = "qwen3", *, hidden: int = 64, layers: int = 2, vocab: int = VOCAB, tied: bool = True,
                dtype: str = "float32", head_dim: int = 32, experts: int = 8, top_k: int = 2, expert_width: int = 32):
    """A transformers config for a tiny Qwen3, Llama or Qwen3-MoE (``kind``; ``experts`` of ``expert_width``, ``top_k``
    routed per token: vLLM's CPU MoE kernel wants hidden and expert width multiples of 32)."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // head_dim, num_key_value_heads=1, head_dim=head_dim,
                  max_position_embeddings=1024, tie_word_embeddings=tied, dtype=dtype, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if kind == "qwen3":
        return Qwen3Config(**common)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k,
                              moe_intermediate_size=expert_width, decoder_sparse_step=1, mlp_only_layers=[],
                              norm_topk_prob=True)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def build_model(seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A tiny causal LM with deterministic random weights (same seed, same weights, on any process)."""
    from transformers import AutoModelForCausalLM

    dtype = config_kwargs.get("dtype", "float32")
    config = tiny_config(**config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def save_model(path: str, seed: int = 0, **config_kwargs) -> str:
    """Save a tiny model (safetensors + config.json) where vLLM can serve it; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    build_model(seed, **config_kwargs).save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """A stand-in for an optimizer step: add seeded noise to every parameter (changes greedy tokens)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def train_step(model: torch.nn.Module, seed: int, lr: float = 0.5) -> float:
    """One real SGD step on a random next-token batch (what an RL step does to the weights, in miniature)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (2, 16), generator=gen)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    model.eval()
    return float(loss.detach())


def adamw_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int, seq: int = 16) -> None:
    """One real optimizer step (``opt``, e.g. AdamW on fp32 master weights) on a random next-token batch."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (2, seq), generator=gen)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of ``prompt`` by ``n`` tokens with plain transformers (the reference vLLM must match)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def hf_reference(model: torch.nn.Module, n: int) -> list[list[int]]:
    """``hf_greedy`` on every prompt of ``prompts()``, in order: what an engine serving ``model`` must generate."""
    return [hf_greedy(model, p, n) for p in prompts().values()]


def prompts(seed: int = 0) -> dict[str, list[int]]:
    """A short prompt and a long one (several KV blocks of 32 tokens, so the prefix cache holds it)."""
    gen = torch.Generator().manual_seed(seed)
    return {"short": torch.randint(2, VOCAB, (5,), generator=gen).tolist(),
            "long": torch.randint(2, VOCAB, (200,), generator=gen).tolist()}


@torch.no_grad()
def touch_experts(model: torch.nn.Module, experts: list[int], seed: int, scale: float = 0.2) -> None:
    """A step that changes only ``experts`` (their gate, up and down rows in every MoE layer) and the attention
    output projections, as a step in which no token was routed to the other experts would. Works on whole tensors
    and on FSDP2 shards (each rank changes the experts it holds; the noise is that of the whole tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")
                or name.endswith("o_proj.weight")):
            continue
        noise = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) * scale
        local, first = p, 0
        if isinstance(p, DTensor):
            local = p.to_local()
            first = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1][0]
        if name.endswith("o_proj.weight"):
            rows = slice(first, first + local.shape[0])
            local.add_(noise[rows])
            continue
        for e in experts:
            if first <= e < first + local.shape[0]:
                local[e - first].add_(noise[e])
