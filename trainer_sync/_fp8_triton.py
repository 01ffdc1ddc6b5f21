"""Fused Triton kernel for the FP8 block codec (CUDA only; imported lazily by codec.py).

One program per 128x128 block: load the block once (bf16/fp16/fp32), amax in registers, scale_inv, IEEE division
(``div_rn``: Triton's plain ``/`` on float32 is an approximate division on NVIDIA GPUs), round-to-nearest-even cast to
e4m3fn, store. 3 bytes of traffic per bf16 element (read 2, write 1) where the torch ops need about 5. The bits are
those of codec.py's definition; benchmarks/bench_fp8_gpu.py checks them against the torch ops on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import FP8_DTYPE, FP8_MAX, MIN_SCALE


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
                               num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    if w.stride(1) != 1:
        w = w.contiguous()
    m, n = w.shape
    nr, nc = triton.cdiv(m, block), triton.cdiv(n, block)
    q = torch.empty(m, n, dtype=torch.float32 if raw else FP8_DTYPE, device=w.device)
    s = torch.empty(nr, nc, dtype=torch.float32, device=w.device)
    _fp8_block_quant_kernel[(nr, nc)](w, q, s, m, n, w.stride(0), q.stride(0), nc, FMAX=FP8_MAX, SMIN=MIN_SCALE,
                                      BLOCK=block, RAW=raw, num_warps=num_warps)
    return q, s
