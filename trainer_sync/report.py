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
                f"{n(self.num_receivers, 'receiver')}, total {self.total_s * 1e3:.1f} ms (plan {self.plan_s * 1e3:.1f}, "
                f"pack {self.pack_s * 1e3:.1f}, transfer {self.transfer_s * 1e3:.1f}, apply {self.apply_s * 1e3:.1f}), "
                f"{self.gbps:.2f} GB/s" + (f", fallback: {self.fallback}" if self.fallback else ""))
