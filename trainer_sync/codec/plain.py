"""The plain codec: a bucket travels as its packed bytes (the tensors in their wire dtype, bf16 / fp32 / fp8
codes + scales), one frame, and the receiver hands out views of its receive buffer (pipeline.Assembler)."""
from __future__ import annotations

from .base import Batch, Codec


class PlainCodec(Codec):
    """A full push: nothing beyond the packed bytes, nothing needed from the receivers."""

    def decode(self, bucket, buf, asm) -> Batch:
        return asm.add(bucket, buf)


PLAIN = PlainCodec()
