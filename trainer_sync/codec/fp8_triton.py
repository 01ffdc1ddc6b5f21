"""Fused Triton kernels for the FP8 block codec (CUDA only; imported lazily by codec/fp8.py, never importing it).

One program per 128x128 block: load the block once (bf16/fp16/fp32), amax in registers, scale_inv, IEEE division
(``div_rn``: Triton's plain ``/`` on float32 is an approximate division on NVIDIA GPUs), round-to-nearest-even cast to
e4m3fn, store. 3 bytes of traffic per bf16 element (read 2, write 1) where the torch ops need about 5. The bits are
those of fp8.py's definition; benchmarks/bench_fp8_gpu.py checks them against the torch ops on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_constants import FP8_DTYPE, FP8_MAX, MIN_SCALE


@triton.jit
def _fp8_block_quant_kernel(w_ptr, q_ptr, s_ptr, M, N, stride_wm, stride_qm, NC,
                            FMAX: tl.constexpr, SMIN: tl.constexpr, BLOCK: tl.constexpr, RAW: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(w_ptr + rows[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    s = tl.maximum(tl.div_rn(amax, FMAX), SMIN)
    y = tl.div_rn(x, s)
    # |y| <= 448 * (1 + 2**-23) already; the clamp only makes the saturating cast's job explicit.
    y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    if RAW:  # testing aid (the CPU interpreter's fp8 cast is not RNE): store the float32 value before the cast
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], y, mask=mask)
    else:
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], y.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask)
    tl.store(s_ptr + pid_m * NC + pid_n, s)


def quantize_fp8_blocks_triton(w: torch.Tensor, block: int = 128, raw: bool = False,
                               num_warps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    if w.stride(1) != 1:
        w = w.contiguous()
    m, n = w.shape
    nr, nc = triton.cdiv(m, block), triton.cdiv(n, block)
    q = torch.empty(m, n, dtype=torch.float32 if raw else FP8_DTYPE, device=w.device)
    s = torch.empty(nr, nc, dtype=torch.float32, device=w.device)
    _fp8_block_quant_kernel[(nr, nc)](w, q, s, m, n, w.stride(0), q.stride(0), nc, FMAX=FP8_MAX, SMIN=MIN_SCALE,
                                      BLOCK=block, RAW=raw, num_warps=num_warps)
    return q, s


@triton.jit
def _fp8_quant_with_scales_kernel(w_ptr, q_ptr, s_ptr, ROWS, N, R0, B0, stride_wm, stride_qm, NC,
                                  FMAX: tl.constexpr, BLOCK: tl.constexpr, RAW: tl.constexpr):
    """Rows [R0, R0 + ROWS) of a matrix (an FSDP dim-0 shard) with given block scales: program (i, j) covers global
    block (B0 + i, j), masked to the rows this shard holds."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lrow = (B0 + pid_m).to(tl.int64) * BLOCK + tl.arange(0, BLOCK) - R0
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (lrow[:, None] >= 0) & (lrow[:, None] < ROWS) & (cols[None, :] < N)
    x = tl.load(w_ptr + lrow[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (B0 + pid_m) * NC + pid_n)
    y = tl.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    if RAW:
        tl.store(q_ptr + lrow[:, None] * stride_qm + cols[None, :], y, mask=mask)
    else:
        tl.store(q_ptr + lrow[:, None] * stride_qm + cols[None, :], y.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask)


def quantize_with_scales_triton(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, row_offset: int = 0,
                                raw: bool = False, num_warps: int = 16) -> torch.Tensor:
    if w.stride(1) != 1:
        w = w.contiguous()
    rows, n = w.shape
    q = torch.empty(rows, n, dtype=torch.float32 if raw else FP8_DTYPE, device=w.device)
    if rows == 0 or n == 0:
        return q
    s = scale_inv.float().contiguous()
    b0, b1 = row_offset // block, triton.cdiv(row_offset + rows, block)
    _fp8_quant_with_scales_kernel[(b1 - b0, s.shape[1])](w, q, s, rows, n, row_offset, b0, w.stride(0), q.stride(0),
                                                        s.shape[1], FMAX=FP8_MAX, BLOCK=block, RAW=raw,
                                                        num_warps=num_warps)
    return q
