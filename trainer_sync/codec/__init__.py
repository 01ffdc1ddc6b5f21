"""Wire formats: what a tensor looks like on the wire. bf16/fp32 pass through as they are; block FP8 (e4m3 + one
float32 ``scale_inv`` per 128x128 block, the checkpoint format) is all here:

* ``fp8.py``: which tensors (``Fp8Rules``, ``fp8_eligible``), quantize / dequantize, the receiver's dequantizer;
* ``fp8_constants.py``: the numbers of the format (block size, e4m3 max, smallest scale), shared by the two below;
* ``fp8_triton.py``: the GPU kernels behind ``quantize_fp8_blocks`` (Triton, loaded only when used);
* ``fp8_source.py``: ``Fp8Source``, a trainer source presenting eligible weights as fp8 + scales (block maxima agreed
  across FSDP / ZeRO shards).
"""
from .fp8 import *  # noqa: F403
from .fp8 import (BLOCK, FP8_DTYPE, FP8_MAX, FP8_NAME, MIN_SCALE, SCALE_SUFFIX, Fp8Arrival, Fp8Dequantizer,  # noqa: F401
                  Fp8Rules, block_amax, dequantize_fp8_blocks, fp8_eligible, fp8_wire_expected, fp8_wire_nbytes,
                  plan_fp8_names, quantize_fp8_blocks, quantize_with_scales, row_block_amax, scale_name, scale_shape,
                  scales_from_amax)


def __getattr__(name):
    # Fp8Source on first use: a receiver (a vLLM worker) imports the codec without the trainer's sources.
    if name == "Fp8Source":
        from .fp8_source import Fp8Source

        return Fp8Source
    raise AttributeError(f"module 'trainer_sync.codec' has no attribute {name!r}")
