"""Wire formats: the exact FP8 block codec (DeepSeek-V3 / Qwen3-FP8 checkpoint layout) and what it applies to.

Format
------
A 2-D weight ``w[out, in]`` becomes ``q`` (``float8_e4m3fn``, same shape) and ``scale_inv`` (``float32``,
``[ceil(out/128), ceil(in/128)]``), one scale per 128x128 block, edge blocks smaller. Names follow the checkpoints:
``x.weight`` carries ``q`` and ``x.weight_scale_inv`` the scales; ``w ~= q.float() * scale_inv`` per block.

Exact definition (every backend gives these bits; tests check them against an independent numpy reference):

* ``amax[b]      = max |w|`` over the block, in float32 (padding never enters: edge blocks see only real elements);
* ``scale_inv[b] = max(fl32(amax[b] / 448), 2**-126)``. 448 is e4m3fn's largest finite value. The floor at the
  smallest normal float32 is the rule for all-zero blocks (scale 2**-126, codes 0, dequantized exactly to 0 of the
  input's sign) and also keeps a block whose amax is tiny (< 448 * 2**-126 ~ 5e-36) from getting a subnormal or zero
  scale, which would turn ``w / scale_inv`` into inf or NaN;
* ``q            = e4m3fn_rne(fl32(w / scale_inv))``: an IEEE float32 division (not a multiply by a reciprocal), then
  round-to-nearest-even to e4m3fn with the sign kept (so -0.0 and negatives that round to zero give code 0x80).
  ``|fl32(w / scale_inv)| <= 448 * (1 + 2**-23)`` always rounds to at most 448, so no clamp is needed; backends
  that clamp anyway (Triton's saturating cast) give the same bits.
* dequantize: ``fl_dtype(fl32(float(q) * scale_inv))``.

Error bound (derived; checked per element in tests/pure/test_codec.py). With ``s = scale_inv`` and ``v = w / s``
(exact), e4m3fn has 3 mantissa bits: for ``|v| >= 2**-6`` (normal range) the grid spacing at ``v`` is ``2**(e-3)`` with
``e = floor(log2|v|)``, below it the subnormal spacing ``2**-9``. Round-to-nearest is off by at most half a spacing,
the float32 division and the float32 product add at most ``2**-24`` relative each, so::

    |w - dequant(w)| <= s * max(2**(e - 4), 2**-10) + 2**-22 * |w|      (+ 2**-149 in float32's subnormal range)

i.e. at most 2**-4 = 6.25 % of ``|w|`` in e4m3's normal range (``|w| >= 2**-6 * s``), at most ``2**-10 * s`` below
it, and per block at most ``16 * s = amax / 28`` (half the largest spacing, that of the top binade [256, 448]).

Non-finite inputs give unspecified codes (a NaN or inf in a block spoils its scale); SyncConfig.check_finite refuses
them before anything is quantized.

Which tensors: ``fp8_eligible(name, shape)``, a pure function of names and shapes (2-D ``*.weight`` of linear
layers; embeddings, lm_head, norms, biases and MoE routers stay in the model dtype unless configured).

Backends: plain torch ops on any device (an amax pass and one dividing cast per column-block strip, no padding);
on CUDA a fused Triton kernel (one read, one write) when Triton is importable. ``TRAINER_SYNC_FP8_BACKEND=torch``
forces the torch ops.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..protocol.messages import SCALE_SUFFIX  # the scale tensor's name suffix, shared with planning

from .fp8_constants import BLOCK, FP8_DTYPE, FP8_MAX, FP8_NAME, MIN_SCALE  # re-exported


# ----------------------------------------------------------------------------------------------------------- names


def scale_name(name: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv`` (the checkpoint name of the block scales)."""
    return name + SCALE_SUFFIX


def scale_shape(shape: Iterable[int], block: int = BLOCK) -> tuple[int, int]:
    out, inp = (int(s) for s in shape)
    return (-(-out // block), -(-inp // block))


# Modules whose 2-D weights are not linear layers (or, like lm_head, are conventionally kept in the model dtype in
# block-FP8 checkpoints): matched against the module path, the part of the name before ".weight".
EMBEDDING_RE = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embeddings?|word_embeddings|position_embeddings|token_type_embeddings|"
    r"tok_embeddings|wte|wpe|shared)$")
LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out|output)$")
# Norm weights are 1-D anyway; MoE routers ("mlp.gate", "router") are 2-D linears that FP8 checkpoints keep in bf16.
ALWAYS_EXCLUDED_RE = re.compile(r"(norm|(^|\.)gate$|(^|\.)router$)")


@dataclass(frozen=True)
class Fp8Rules:
    """What goes to FP8. Trainer and receiver must use the same rules (the defaults on both sides by default)."""

    include_embeddings: bool = False
    include_lm_head: bool = False
    exclude: tuple[str, ...] = ()  # extra regexes (re.search on the full name) kept in the model dtype
    min_numel: int = 1

    def eligible(self, name: str, shape: Iterable[int], dtype: str | torch.dtype | None = None) -> bool:
        return fp8_eligible(name, shape, dtype, rules=self)

    def to_dict(self) -> dict:
        """JSON-able (JoinInfo.fp8_rules): the trainer's rules travel to the receivers."""
        return {"include_embeddings": self.include_embeddings, "include_lm_head": self.include_lm_head,
                "exclude": list(self.exclude), "min_numel": self.min_numel}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Fp8Rules | None":
        return None if d is None else cls(bool(d.get("include_embeddings", False)),
                                          bool(d.get("include_lm_head", False)), tuple(d.get("exclude", ())),
                                          int(d.get("min_numel", 1)))


def fp8_eligible(name: str, shape: Iterable[int], dtype: str | torch.dtype | None = None, *,
                 rules: Fp8Rules | None = None) -> bool:
    """Whether tensor ``name`` of ``shape`` travels block-quantized: a 2-D floating ``*.weight`` of a linear layer.

    Pure over names/shapes (and optionally the dtype: integer and already-fp8 tensors never are).
    """
    rules = rules or Fp8Rules()
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or math.prod(shape) < max(rules.min_numel, 1):
        return False
    if dtype is not None:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not dt.is_floating_point or dt.itemsize == 1:
            return False
    if name != "weight" and not name.endswith(".weight"):
        return False
    module = name[:-len("weight")].rstrip(".")
    if ALWAYS_EXCLUDED_RE.search(module):
        return False
    if EMBEDDING_RE.search(module) and not rules.include_embeddings:
        return False
    if LM_HEAD_RE.search(module) and not rules.include_lm_head:
        return False
    return not any(re.search(p, name) for p in rules.exclude)


def fp8_wire_nbytes(shape: Iterable[int], block: int = BLOCK) -> int:
    """Bytes of q + scale_inv for one eligible tensor."""
    shape = tuple(int(s) for s in shape)
    return math.prod(shape) + 4 * math.prod(scale_shape(shape, block))


# ----------------------------------------------------------------------------------------------------------- codec


def _backend(t: torch.Tensor, backend: str | None) -> str:
    backend = backend or os.environ.get("TRAINER_SYNC_FP8_BACKEND") or "auto"
    if backend == "auto":
        return "triton" if t.is_cuda and _triton_ok() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"fp8 backend must be auto, torch or triton, got {backend!r}")
    return backend


_TRITON: list = []


def _triton_ok() -> bool:
    if not _TRITON:
        try:
            from . import fp8_triton  # noqa: F401

            _TRITON.append(True)
        except Exception:  # noqa: BLE001 - no triton (CPU wheels) or a broken install: torch ops then
            _TRITON.append(False)
    return _TRITON[0]


def _check2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {list(w.shape)}")


def row_block_amax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``[rows, ceil(cols/block)]`` float32: max |w| of every row within every column block.

    Views only (no padding copy): the full column blocks as ``[rows, C0, block]`` and the ragged last one apart.
    ``vector_norm(ord=inf)`` is max |x| in one reduction pass (exact: a max needs no rounding).
    """
    rows, cols = w.shape
    c0, rem = divmod(cols, block)
    parts = []
    if c0:
        parts.append(torch.linalg.vector_norm(w[:, :c0 * block].unflatten(1, (c0, block)), ord=math.inf, dim=2))
    if rem:
        parts.append(torch.linalg.vector_norm(w[:, c0 * block:], ord=math.inf, dim=1, keepdim=True))
    if not parts:
        return torch.zeros(rows, 0, dtype=torch.float32, device=w.device)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.float()


def block_amax(w: torch.Tensor, block: int = BLOCK, row_offset: int = 0, total_rows: int | None = None) -> torch.Tensor:
    """float32 amax of every 128x128 block of the full matrix that ``w`` is rows ``[row_offset, row_offset+rows)``
    of (``total_rows`` rows in all; default: ``w`` is the whole matrix). Blocks ``w`` does not touch get 0, so an
    all-reduce(MAX) of every shard's result gives the full matrix's amax (used for FSDP dim-0 shards)."""
    _check2d(w, "block_amax")
    rows, cols = w.shape
    total_rows = rows + row_offset if total_rows is None else total_rows
    if row_offset < 0 or row_offset + rows > total_rows:
        raise ValueError(f"block_amax: rows [{row_offset}, {row_offset + rows}) outside [0, {total_rows})")
    nr, nc = -(-total_rows // block), -(-cols // block)
    per_row = row_block_amax(w, block)  # [rows, nc], 1/block of the input
    if row_offset == 0 and rows == total_rows and rows % block == 0:
        return per_row.view(nr, block, nc).amax(dim=1)
    full = torch.zeros(nr * block, nc, dtype=torch.float32, device=w.device)
    full[row_offset:row_offset + rows] = per_row
    return full.view(nr, block, nc).amax(dim=1)


def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """scale_inv = max(amax / 448, 2**-126) in float32 (IEEE division, as the reference)."""
    return torch.div(amax.float(), FP8_MAX).clamp_min_(MIN_SCALE)


def _row_scales(scale_inv: torch.Tensor, rows: int, block: int, row_offset: int) -> torch.Tensor:
    """Per-row scales ``[rows, C]`` for rows ``[row_offset, row_offset + rows)`` (small: 1/block of the input)."""
    b0 = row_offset // block
    b1 = -(-(row_offset + rows) // block)
    s = scale_inv[b0:b1].repeat_interleave(block, dim=0)
    off = row_offset - b0 * block
    return s[off:off + rows]


def quantize_with_scales(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, row_offset: int = 0,
                         out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """q = e4m3fn(w / scale_inv) for rows ``[row_offset, row_offset + rows)`` of a matrix with block scales
    ``scale_inv``. Torch ops: one dividing cast per strip of full column blocks (the division runs in float32 and the
    cast to fp8 is fused into it on CUDA), one for the ragged last strip; on CUDA a Triton kernel when available."""
    _check2d(w, "quantize_with_scales")
    rows, cols = w.shape
    if out is None and w.numel() and _backend(w, backend) == "triton":
        from .fp8_triton import quantize_with_scales_triton

        return quantize_with_scales_triton(w, scale_inv, block, row_offset)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=w.device) if out is None else out
    if w.numel() == 0:
        return q
    s = _row_scales(scale_inv.float(), rows, block, row_offset)  # [rows, C]
    c0, rem = divmod(cols, block)
    if c0:
        # float8 takes no part in type promotion, but a float32 result is cast into an fp8 ``out`` (fused on CUDA).
        torch.div(w[:, :c0 * block].unflatten(1, (c0, block)), s[:, :c0, None],
                  out=q[:, :c0 * block].unflatten(1, (c0, block)))
    if rem:
        torch.div(w[:, c0 * block:], s[:, c0:c0 + 1], out=q[:, c0 * block:])
    return q


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK, backend: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[out, in]`` -> ``(q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/block), ceil(in/block)])``
    on ``w``'s device, exactly as defined in this module's docstring."""
    _check2d(w, "quantize_fp8_blocks")
    if not w.is_floating_point() or w.dtype.itemsize == 1:
        raise ValueError(f"quantize_fp8_blocks: expected a bf16/fp16/fp32 tensor, got {w.dtype}")
    if _backend(w, backend) == "triton" and w.numel():
        from .fp8_triton import quantize_fp8_blocks_triton

        return quantize_fp8_blocks_triton(w, block)
    scale_inv = scales_from_amax(block_amax(w, block))
    return quantize_with_scales(w, scale_inv, block), scale_inv


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          block: int = BLOCK) -> torch.Tensor:
    """``fl_dtype(fl32(float(q) * scale_inv))`` with one scale per ``block`` x ``block`` block."""
    _check2d(q, "dequantize_fp8_blocks")
    rows, cols = q.shape
    if tuple(scale_inv.shape) != scale_shape(q.shape, block):
        raise ValueError(f"dequantize_fp8_blocks: scale_inv shape {list(scale_inv.shape)} does not match "
                         f"{list(scale_shape(q.shape, block))} for q {list(q.shape)}")
    x = q.to(torch.float32)
    if x.numel():
        s = _row_scales(scale_inv.float(), rows, block, 0)
        c0, rem = divmod(cols, block)
        if c0:
            x[:, :c0 * block].unflatten(1, (c0, block)).mul_(s[:, :c0, None])
        if rem:
            x[:, c0 * block:].mul_(s[:, c0:c0 + 1])
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- receiving side


def fp8_wire_expected(tensors: dict[str, tuple[tuple[int, ...], str | None]], rules: Fp8Rules | None = None
                      ) -> tuple[dict[str, tuple[tuple[int, ...], str | None]], dict[str, str | None]]:
    """A bf16/fp32 receiver that opted in to fp8 on the wire: what it expects on the wire instead of its model's
    tensors (eligible ``x.weight`` as float8 plus ``x.weight_scale_inv`` float32), and the dtype it wants each
    dequantized tensor in (its own expectation)."""
    rules = rules or Fp8Rules()
    wire: dict[str, tuple[tuple[int, ...], str | None]] = {}
    dequant_to: dict[str, str | None] = {}
    for name, (shape, dtype) in tensors.items():
        if rules.eligible(name, shape, dtype):
            wire[name] = (tuple(shape), FP8_NAME)
            wire[scale_name(name)] = (scale_shape(shape), "float32")
            dequant_to[name] = dtype
        else:
            wire[name] = (tuple(shape), dtype)
    return wire, dequant_to


class Fp8Dequantizer:
    """Wraps a receiver's ``on_batch`` for one push: fp8 weights and their scales are paired and handed on
    dequantized (a fresh tensor of the wanted dtype, under the weight's name); everything else passes through.

    A weight and its scale may come in different rounds (an FSDP weight completes when its last shard arrives, its
    scale may come earlier or later from another rank), so whichever comes first is kept (copied: batch tensors are
    views of receive buffers) until its partner arrives. ``finish()`` raises if anything is left unpaired.
    """

    def __init__(self, on_batch: Callable, fp8_names: Iterable[str], dtype_of_name: Callable[[str], torch.dtype],
                 block: int = BLOCK):
        self.on_batch = on_batch
        self.fp8 = set(fp8_names)  # names (with aliases) that arrive as float8 and have a scale on the wire
        self.scales = {scale_name(n) for n in self.fp8}
        self.dtype_of_name = dtype_of_name
        self.block = block
        self.waiting_q: dict[str, torch.Tensor] = {}
        self.waiting_s: dict[str, torch.Tensor] = {}

    def __call__(self, batch) -> None:
        out = []
        for name, t in batch:
            if name in self.fp8:
                s = self.waiting_s.pop(name, None)
                if s is None:
                    self.waiting_q[name] = t.clone()
                    continue
                out.append((name, dequantize_fp8_blocks(t, s, self.dtype_of_name(name), self.block)))
            elif name in self.scales:
                base = name[:-len(SCALE_SUFFIX)]
                q = self.waiting_q.pop(base, None)
                if q is None:
                    self.waiting_s[base] = t.clone()
                    continue
                out.append((base, dequantize_fp8_blocks(q, t, self.dtype_of_name(base), self.block)))
            else:
                out.append((name, t))
        if out:
            self.on_batch(out)

    def finish(self) -> None:
        left = sorted(self.waiting_q) + sorted(scale_name(n) for n in self.waiting_s)
        if left:
            raise RuntimeError(f"fp8 on the wire: weights or scales arrived without their partner: {left}")


class Fp8Arrival:
    """Receiver side of case (b), a bf16/fp32 engine that opted in to fp8 on the wire: the expectations it publishes
    (``wire_expected``: None when it states none) and, per push, the ``on_batch`` wrapper that dequantizes into the
    dtype the receiver expected for each weight (``dtype`` where it stated none)."""

    def __init__(self, expected, dtype: torch.dtype = torch.bfloat16, rules: Fp8Rules | None = None):
        from ..protocol.messages import Expected

        self.dtype = dtype
        self.dequant_to: dict[str, str | None] = {}
        self.wire_expected = None
        if expected is not None and expected.tensors:
            wire, self.dequant_to = fp8_wire_expected(expected.tensors, rules)
            self.wire_expected = Expected(wire, model=expected.model)

    def _dtype(self, name: str) -> torch.dtype:
        want = self.dequant_to.get(name)
        return getattr(torch, want) if want else self.dtype

    def wrap(self, on_batch: Callable, plan) -> Fp8Dequantizer:
        return Fp8Dequantizer(on_batch, plan_fp8_names(plan.tensors), self._dtype)


def plan_fp8_names(tensors) -> list[str]:
    """Names (primary and aliases) of a plan's float8 tensors that have a ``*_scale_inv`` partner in the plan."""
    names = []
    for t in tensors.values():
        if t.dtype == FP8_NAME and scale_name(t.name) in tensors:
            names.append(t.name)
            names.extend(a for a in t.aliases if scale_name(a) in tensors[scale_name(t.name)].aliases)
    return names
