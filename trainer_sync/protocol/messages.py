"""What trainer and receivers say to each other, and nothing else: the bottom layer of the package.

* ``JoinInfo``: what an engine is given to join the bridging group (its init info, JSON over vLLM's RPC).
* ``Expected``: what a receiver says it expects (tensor name -> shape, dtype), published when it joins.
* ``Verdict``: what trainer rank 0 decided about one step of a push (WeightSync's agreement), the same on every rank.
* ``Keys``: the names of every key in the bridging group's store, in one place.
* ``SCALE_SUFFIX``: the block-FP8 scale tensor's name suffix (a wire fact that planning and the codec share).

Only the standard library (and ``Fp8Rules``'s JSON form, plain data): a vLLM worker imports this to join without
importing the trainer side (sources, catch-up, torch's DTensor helpers).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# ``x.weight`` in block FP8 comes with ``x.weight_scale_inv`` (one float32 per 128x128 block): checkpoint format.
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class JoinInfo:
    """Everything a receiver needs to join: passed to engines as their init info (JSON-able)."""

    host: str
    port: int
    token: str = field(repr=False)  # never printed or logged
    epoch: int
    num_trainers: int
    num_receivers: int
    receiver_rank: int
    backend: str
    timeout_s: float
    bucket_timeout_s: float | None = None
    push_timeout_s: float | None = None
    # The trainer's SyncConfig.wire_dtype: "fp8" tells an engine serving a bf16/fp32 model to dequantize on arrival.
    wire_dtype: str = "auto"
    # The trainer's SyncConfig.engine_apply: "auto" lets a vLLM engine copy pushes straight into place once it proved
    # that safe for its model (engines/placement.py); "layerwise" keeps vLLM's layerwise reload for every push.
    engine_apply: str = "auto"
    # The trainer's SyncConfig.fp8_rules (codec.Fp8Rules as a dict; None: the defaults): which tensors go block-FP8.
    # Trainer and receivers must agree on it, so the receiver takes it from here rather than from its own defaults.
    fp8_rules: dict | None = None
    # The trainer's SyncConfig.delta and delta_mirror_mb: whether receivers keep what they need to take deltas.
    delta: str = "auto"
    delta_mirror_mb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Expected:
    """What a receiver expects to get: tensor name -> (shape, dtype). A dtype of None accepts any dtype."""

    tensors: dict[str, tuple[tuple[int, ...], str | None]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({n: [list(s), d] for n, (s, d) in self.tensors.items()})

    @classmethod
    def from_json(cls, text: str) -> "Expected":
        return cls({n: (tuple(s), d) for n, (s, d) in json.loads(text).items()})


@dataclass
class Verdict:
    """Trainer rank 0's decision about one step (count the receivers, begin, end a push), broadcast to every rank.

    ``error``/``stage``/``who``: the failure every rank raises (empty: none). ``members``: the engines the failure
    names, as data. ``dead``: engines that died and leave the membership. ``refused``: the handshake's mismatch
    lines (the push was refused, nothing was sent), ``receivers``: the receiver ranks that refused. ``changed``: the
    membership changed (a new epoch is due). ``data``: the step's result (receiver counts, offsets, the engines'
    version)."""

    error: str = ""
    stage: str = ""
    who: str = ""
    members: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    refused: list[str] | None = None
    receivers: list[int] = field(default_factory=list)
    changed: bool = False
    data: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.error)


class Keys:
    """Names of the keys in the bridging group's store (one epoch's PrefixStore). ``p`` is a push's prefix."""

    LAYOUT = "layout"  # transport/layout.py: who gets which buckets by CUDA IPC
    WIRE_FP8 = "wire/fp8"  # wire_dtype "auto": rank 0's decision to send block FP8

    @staticmethod
    def push(seq: int) -> str:
        """The prefix of every key of push number ``seq`` of an epoch."""
        return f"p{seq}/"

    @staticmethod
    def expected(receiver: int) -> str:
        return f"expected/{receiver}"

    @staticmethod
    def pieces(p: str, trainer: int) -> str:
        return f"{p}pieces/{trainer}"

    @staticmethod
    def plan(p: str) -> str:
        return f"{p}plan"

    @staticmethod
    def done(p: str, receiver: int) -> str:
        return f"{p}done/{receiver}"

    @staticmethod
    def abort(p: str) -> str:
        return f"{p}abort"

    @staticmethod
    def open_session(receiver: int) -> str:
        """Whether a receiver's engine worker holds an update session an earlier trainer left open (the vLLM backend
        writes it when it joins; the trainer closes such sessions before its first push)."""
        return f"open-session/{receiver}"

    @staticmethod
    def shard_ranges(receiver: int) -> str:
        """A TP worker's parts of each tensor (engines/vllm/shards.py), for its engine's other workers."""
        return f"shards/ranges/{receiver}"

    @staticmethod
    def shard_sums(p: str, round_: int, receiver: int) -> str:
        """A TP worker's checksum sums of its parts of one round's delta buckets (codec/delta/shards.py)."""
        return f"{p}shards/sums/{round_}/{receiver}"

    @staticmethod
    def delta_state(receiver: int) -> str:
        """What a receiver holds when it joins (delta_policy.receiver_state); later states come with its acks."""
        return f"delta/state/{receiver}"

    @staticmethod
    def delta_ack(p: str, receiver: int) -> str:
        """After a delta transfer: whether the receiver applied every delta or refused one (base mismatch)."""
        return f"{p}delta/ack/{receiver}"

    @staticmethod
    def delta_stats(p: str, trainer: int) -> str:
        """A trainer rank's bytes sent / full bytes / changed elements of a push."""
        return f"{p}delta/stats/{trainer}"

    @staticmethod
    def ipc(p: str, trainer: int) -> str:
        return f"{p}ipc/{trainer}"
