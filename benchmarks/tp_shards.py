"""Which slab of a checkpoint tensor one tensor-parallel rank of a vLLM Llama/Qwen3 engine keeps.

``bench_multi_gpu.py``'s stand-in receivers keep exactly this shard of a full push, as vLLM's weight loaders do:
q/k/v_proj by heads along dim 0 (k/v replicated when tp > kv heads: rank t keeps head ``t // (tp // kv)``),
gate/up_proj evenly along dim 0, o/down_proj evenly along dim 1, embed_tokens/lm_head by rows of the vocab padded
to a multiple of 64, every norm whole. The rules come from the TP-aware planner that issue 25 removed (its note is in
ARCHITECTURE.md), which was unit-tested against vLLM's own loaders; the simulator's closed-form bytes per tp rank
(``simulate.Workload.bytes_per_tp_rank``) is checked against them in tests/pure/test_simulate.py.
"""
from __future__ import annotations

import math
import re

VOCAB_PAD = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


def _even(size: int, tp: int, rank: int, name: str) -> tuple[int, int]:
    if size % tp:
        raise ValueError(f"{name}: {size} does not split evenly over tp {tp}")
    per = size // tp
    return rank * per, (rank + 1) * per


def _heads(size: int, heads: int, tp: int, rank: int, name: str) -> tuple[int, int]:
    head_dim = size // heads
    if heads % tp == 0:
        per = heads // tp
        return rank * per * head_dim, (rank + 1) * per * head_dim
    if tp % heads == 0:  # GQA k/v heads replicated over tp // heads ranks
        head = rank // (tp // heads)
        return head * head_dim, (head + 1) * head_dim
    raise ValueError(f"{name}: {heads} heads cannot be split over tp {tp}")


def shard_slice(name: str, shape: tuple[int, ...], heads: int, kv_heads: int, tp: int,
                rank: int) -> tuple[int, int, int] | None:
    """(dim, lo, hi) of the slab tp rank ``rank`` of ``tp`` keeps, or None when it keeps the whole tensor."""
    if re.search(r"(^|\.)q_proj\.weight$", name):
        return (0, *_heads(shape[0], heads, tp, rank, name))
    if re.search(r"(^|\.)(k_proj|v_proj)\.weight$", name):
        return (0, *_heads(shape[0], kv_heads, tp, rank, name))
    if re.search(r"(^|\.)(gate_proj|up_proj)\.weight$", name):
        return (0, *_even(shape[0], tp, rank, name))
    if re.search(r"(^|\.)(o_proj|down_proj)\.weight$", name):
        return (1, *_even(shape[1], tp, rank, name))
    if re.search(r"(^|\.)(embed_tokens|lm_head)\.weight$", name):
        padded = -(-shape[0] // VOCAB_PAD) * VOCAB_PAD
        lo, hi = _even(padded, tp, rank, name)
        return 0, min(lo, shape[0]), min(hi, shape[0])  # padding rows are the engine's own zeros
    if re.search(r"norm\.weight$", name):
        return None
    raise ValueError(f"{name}: no tensor-parallel rule for this tensor")


def shard_numel(name: str, shape: tuple[int, ...], heads: int, kv_heads: int, tp: int, rank: int) -> int:
    cut = shard_slice(name, shape, heads, kv_heads, tp, rank)
    if cut is None:
        return math.prod(shape)
    dim, lo, hi = cut
    return math.prod(shape) // shape[dim] * (hi - lo)
