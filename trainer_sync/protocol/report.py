"""SyncReport: what one push did and how long each stage took."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SyncReport:
    version: int
    seq: int
    bytes: int  # bytes on the wire per receiver (the plan's total)
    num_buckets: int
    num_receivers: int
    plan_s: float  # metadata exchange, planning, handshake
    pack_s: float  # this rank: copying (and casting) parameters into buckets
    transfer_s: float  # this rank: waiting on the wire beyond what packing hid
    apply_s: float  # slowest receiver: handing tensors to the load callback
    total_s: float  # wall time of the push on this rank, acknowledgements included
    fallback: str | None = None  # why the push ran slower than configured (memory budget), else None
    wire_dtype: str = ""
    # How the receivers applied it, as they said ("direct": vLLM engines copied into place; "layerwise": vLLM's
    # reload; empty for plain receivers), comma-joined when they differ.
    engine_apply: str = ""
    # Delta pushes (SyncConfig.delta): bytes each receiver got on the wire (headers included), what a full push
    # would have sent, the fraction of wire elements that changed over the delta-encoded buckets (None: a full push,
    # nothing compared), and why the push went full (None when it went as deltas).
    bytes_sent: int = 0
    bytes_full: int = 0
    changed_fraction: float | None = None
    full_reason: str | None = None
    # A PEFT LoRA model (SyncConfig.lora): how this push went ("adapter", "merged" with the base too, or
    # "merged-partial": the adapted modules only; empty for a dense model) and why that mode.
    lora: str = ""
    lora_reason: str = ""

    @property
    def gbps(self) -> float:
        """Effective GB/s of model bytes delivered to each receiver."""
        return self.bytes / self.total_s / 1e9 if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gbps"] = self.gbps
        return d

    def __str__(self) -> str:
        def n(count: int, noun: str) -> str:
            return f"{count} {noun}{'' if count == 1 else 's'}"

        return (f"v{self.version}: {self.bytes / 1e6:.1f} MB in {n(self.num_buckets, 'bucket')} to "
                f"{n(self.num_receivers, 'receiver')}, total {self.total_s * 1e3:.1f} ms "
                f"(plan {self.plan_s * 1e3:.1f}, pack {self.pack_s * 1e3:.1f}, "
                f"transfer {self.transfer_s * 1e3:.1f}, apply {self.apply_s * 1e3:.1f}), "
                f"{self.gbps:.2f} GB/s" + (f", fallback: {self.fallback}" if self.fallback else "") +
                (f", delta: {self.bytes_sent / 1e6:.1f} of {self.bytes_full / 1e6:.1f} MB sent, "
                 f"{self.changed_fraction:.2%} changed" if self.changed_fraction is not None else ""))
