"""The codec interface: how one bucket's packed bytes travel, the stage between pack and wire (and wire and apply).

The pipeline's one send loop and one receive loop (pipeline/loops.py) call a push's codec per bucket; the transport
carries whatever frames it makes. So a full push and a delta push go through the same overlapped stages:

* trainer: pack bucket k (cast to the wire dtype) -> ``encode`` (the frames to post, in order) -> the transport
  posts them -> ``sent`` (work done while they are on the wire: the delta codec advances its cache);
* receiver: ``first`` (where the first frame of a bucket lands) -> the transport receives it -> ``rest`` (where the
  rest lands, once the first is known: a delta's body, sized by its header) -> ``decode`` (the bucket's tensors).

A codec is made per push from what the plan and the trainer decided (``plain.PlainCodec`` for a full push, the
delta codec ``delta.codec.DeltaCodec`` against a base the receiver must hold). What a codec needs from the receivers
(for a delta: that they hold the base) is settled by the verdict round after the pass (``verdict``): a receiver
that refuses makes every member run the same push again as a full pass (``resend``).

Block FP8 is a codec of the element values rather than of the bucket bytes: its scales are agreed across the
trainer's shards before packing (codec/fp8_source.py), and the receiver dequantizes whole tensors on arrival
(``Fp8Arrival``). It composes with the bucket codecs: a delta push of an FP8 plan encodes the packed FP8 codes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from ..plan.buckets import Bucket, BucketPlan

if TYPE_CHECKING:
    from ..pipeline.loops import Assembler

Batch = list[tuple[str, torch.Tensor]]


class Codec(ABC):
    """One push's bucket codec (sender side, receiver side, or both: each side uses its half)."""

    #: Whether the receivers' verdicts decide the push (a delta: one not at the base refuses it).
    verdict = False

    # --- trainer side --------------------------------------------------------------------------------------------
    def encode(self, bucket: Bucket, data: torch.Tensor) -> list[torch.Tensor]:
        """The frames carrying ``data`` (the packed ``bucket``, ``bucket.nbytes``), posted in this order."""
        return [data]

    def sent(self, bucket: Bucket, data: torch.Tensor) -> None:
        """``bucket``'s frames are on the wire (work that overlaps with the transfer goes here)."""

    # --- receiver side -------------------------------------------------------------------------------------------
    def buffer_bytes(self, plan: BucketPlan) -> int:
        """The receive buffer a bucket of ``plan`` needs."""
        return plan.max_bucket_bytes

    def first(self, bucket: Bucket, buf: torch.Tensor) -> torch.Tensor:
        """Where the first frame of ``bucket`` lands in its receive buffer ``buf``."""
        return buf[:bucket.nbytes]

    def rest(self, bucket: Bucket, buf: torch.Tensor) -> torch.Tensor | None:
        """After the first frame arrived: where the rest lands (None: nothing more comes)."""
        return None

    def arriving(self, buckets: list[Bucket]) -> None:
        """This round's first frames are on the way (work that needs no bytes of them goes here)."""

    @abstractmethod
    def decode(self, bucket: Bucket, buf: torch.Tensor, asm: "Assembler") -> Batch:
        """The tensors completed by ``bucket`` (received whole into ``buf``)."""

    # --- both: the verdict round ---------------------------------------------------------------------------------
    def refusal(self) -> str | None:
        """Receiver: why it refuses this push (None: it took it)."""
        return None

    def resend(self, refusals: list[str]) -> None:
        """Some receivers refused (``refusals``: "receiver j: why"): the same push goes again, full (this codec
        now encodes / decodes that)."""
