"""The numbers that define block FP8 (e4m3fn codes, one float32 ``scale_inv`` per block), in a module of their own so
that the torch ops (fp8.py) and the Triton kernels (fp8_triton.py) share them without importing each other."""
from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 2.0 ** -126  # smallest normal float32: the scale of all-zero (and tiny) blocks
FP8_NAME = "float8_e4m3fn"
