"""What trainer and receivers say to each other, and nothing else: the bottom layer of the package.

* ``JoinInfo``: what an engine is given to join the bridging group (its init info, JSON over vLLM's RPC).
* ``Expected``: what a receiver says it expects (tensor name -> shape, dtype), published when it joins.
* ``Pieces``: what one trainer rank holds of a push (its pieces, the names holding NaN/Inf), for rank 0's plan.
* ``PlanOffer`` / ``PlanRefusal``: rank 0's plan of a push, or why it was refused (nothing is sent then).
* ``Ack``: a receiver's acknowledgement of a push: how long it took, or the ``ErrorInfo`` it failed with.
* ``PassVerdict``: a receiver's verdict on a delta pass (refused, and why); ``CatchupOffer``: what a trainer rank
  offers a joining engine (its kept version and plan).
* ``ServedVersion``: what an engine worker says it serves when it joins (the last push it applied);
  ``UpdateSession``: whether it holds an update session an earlier trainer left open.
* ``WireFp8Decision``: trainer rank 0's choice (``wire_dtype="auto"``) to send block FP8, for the other ranks.
* ``DeltaState`` / ``PushStats`` (protocol/delta.py): a receiver's delta state, a trainer rank's push stats.
* ``LayoutAnnouncement``: trainer rank 0's choice of transports for an epoch (or why there is none).
* ``ErrorInfo``: a failure as typed fields (kind, engine, parameter, receiver, stage, message), never parsed from
  text; ``ErrorKind`` names the kinds.
* ``Verdict``: what trainer rank 0 decided about one step of a push (WeightSync's agreement), the same on every rank.
* ``Keys``: the names of every key in the bridging group's store, in one place.
* ``SCALE_SUFFIX``: the block-FP8 scale tensor's name suffix (a wire fact that planning and the codec share).

Every message has a ``protocol_version``; wire.py turns them into JSON and back, and checks them, in one place.
Only the standard library and errors.py (and ``Fp8Rules``'s JSON form, plain data): a vLLM worker imports this to
join without importing the trainer side (sources, catch-up, torch's DTensor helpers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import Aborted, HandshakeMismatch, describe
from . import wire
from .delta import DeltaState
from .lora import LoraOffer
from .wire import PROTOCOL_VERSION

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
    # that safe for its model (engines/vllm/placement.py); "layerwise" keeps vLLM's layerwise reload for every push.
    engine_apply: str = "auto"
    # The trainer's SyncConfig.fp8_rules (codec.Fp8Rules as a dict; None: the defaults): which tensors go block-FP8.
    # Trainer and receivers must agree on it, so the receiver takes it from here rather than from its own defaults.
    fp8_rules: dict | None = None
    # The trainer's SyncConfig.delta and delta_mirror_mb: whether receivers keep what they need to take deltas.
    delta: str = "auto"
    delta_mirror_mb: float | None = None
    protocol_version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict:
        """The init info vLLM passes to every worker (``JoinInfo.read`` reads it back)."""
        return wire.to_wire(self)

    @classmethod
    def read(cls, info: "JoinInfo | dict", stage: str = "rendezvous") -> "JoinInfo":
        """A JoinInfo from what a receiver or an engine was given: a JoinInfo, its ``to_dict()``, or a dict a user
        wrote by hand (``dict(host=..., port=..., ...)``, no ``type``: read as this release's version, so a missing
        or unknown field is still named)."""
        if isinstance(info, cls):
            return info
        if isinstance(info, dict) and "type" not in info:
            info = {"type": cls.__name__, "protocol_version": PROTOCOL_VERSION, **info}
        return wire.from_wire(info, cls, stage=stage)


@dataclass(frozen=True)
class Expected:
    """What a receiver expects to get: tensor name -> (shape, dtype). A dtype of None accepts any dtype.

    ``model``: the served model's architecture facts that no tensor shape shows (how many experts a token is routed
    to, say: plan/handshake.py ``model_facts``); the trainer refuses a push whose model disagrees on one."""

    tensors: dict[str, tuple[tuple[int, ...], str | None]] = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION

    WIRE_DECODE: ClassVar[dict] = {"tensors": lambda t: {n: (tuple(s), d) for n, (s, d) in t.items()}}

    def to_json(self) -> str:
        return wire.encode(self)

    @classmethod
    def from_json(cls, text: str) -> "Expected":
        return wire.decode(text, cls, stage="handshake")


class ErrorKind:
    """What an ``ErrorInfo`` says happened, which decides what the trainer does with the engine."""

    REFUSED = "refused"  # the handshake refused the plan: nothing was sent or applied
    UNTOUCHED = "untouched"  # failed before any weight was applied: the engine serves its old weights whole
    FAILED = "failed"  # failed, possibly after applying some weights (an engine then stays paused)
    ABORTED = "aborted"  # gave up because another member gave up first (its error says why)


@dataclass(frozen=True)
class ErrorInfo:
    """One failure as data. ``message`` is the text people read (unchanged from what the error always said); the
    other fields are what code decides on: never recognise an error by its text. ``engine``: the engine's name as
    the trainer knows it (filled in by the trainer; a worker does not know it); ``parameter``: the tensor at fault,
    where one is; ``receiver``: the receiver rank that failed."""

    kind: str
    message: str
    engine: str = ""
    parameter: str = ""
    receiver: int | None = None
    stage: str = ""
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def of(cls, error: BaseException, message: str | None = None, **fields) -> "ErrorInfo":
        """The ErrorInfo of an exception: its kind from its class, its stage and parameter where it has them."""
        kind = ErrorKind.REFUSED if isinstance(error, HandshakeMismatch) else \
            ErrorKind.ABORTED if isinstance(error, Aborted) else ErrorKind.FAILED
        fields.setdefault("stage", getattr(error, "stage", "") or "")
        fields.setdefault("parameter", getattr(error, "parameter", "") or "")
        return cls(kind, describe(error) if message is None else message, **fields)


@dataclass(frozen=True)
class Pieces:
    """What one trainer rank holds of a push: ``[name, shape, dtype, start, numel]`` per piece, and the names of
    the tensors holding NaN or Inf (SyncConfig.check_finite)."""

    pieces: list[list]
    nonfinite: list[str] = field(default_factory=list)
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class PlanOffer:
    """Rank 0's plan of push ``version``: the bucket plan (plan/buckets.py JSON), buffers per stage, the memory
    budget's fallback note, the delta decision (plan/delta_policy.py DeltaDecision JSON; None: full), and what the
    push is for a LoRA trainer (protocol/lora.py LoraOffer; None: plain weights)."""

    plan: str
    num_buffers: int
    version: int
    fallback: str | None = None
    delta: dict | None = None
    lora: LoraOffer | None = None
    protocol_version: int = PROTOCOL_VERSION

    WIRE_DECODE: ClassVar[dict] = {"lora": lambda d: wire.from_wire(d, LoraOffer)}


@dataclass(frozen=True)
class PlanRefusal:
    """The handshake refused the push (nothing is sent): the mismatch lines, and the receiver ranks that refused."""

    lines: list[str]
    receivers: list[int] = field(default_factory=list)
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Ack:
    """A receiver's acknowledgement of one push: its times, its delta state (protocol/delta.py ``DeltaState``),
    how a vLLM engine applied it; or ``error`` (and a short ``trace``) when it failed."""

    apply_s: float = 0.0
    transfer_s: float = 0.0
    delta_state: DeltaState | None = None
    engine_apply: str = ""
    error: ErrorInfo | None = None
    trace: str = ""
    protocol_version: int = PROTOCOL_VERSION

    WIRE_DECODE: ClassVar[dict] = {"error": lambda e: wire.from_wire(e, ErrorInfo),
                                   "delta_state": lambda d: wire.from_wire(d, DeltaState)}

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class PassVerdict:
    """A receiver's verdict on a pass it received (pipeline/verdict.py): why it refused it (a delta whose base it
    does not hold), or None when it took it."""

    refused: str | None = None
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class CatchupOffer:
    """A trainer rank's answer to a joining engine (rank/catchup.py): the version it keeps (None: no complete one),
    from rank 0 that version's bucket plan (plan/buckets.py JSON), and the version its kept deltas start from
    (``delta_base``: a joiner holding it may take deltas; None: full only)."""

    version: int | None
    plan: str | None = None
    delta_base: int | None = None
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class ServedVersion:
    """What an engine worker serves, said when it joins (``Keys.served_version``): the version of the last push it
    applied whole, by any trainer (None: none since the engine started). vLLM 0.26 keeps no weight version of its
    own, so this is how a new trainer learns where the engine's count stands (engines/vllm/compat.py
    ``served_version`` decides which of the two a trainer believes)."""

    version: int | None = None
    protocol_version: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return wire.encode(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ServedVersion":
        return wire.decode(text, cls, stage="rendezvous")


@dataclass(frozen=True)
class UpdateSession:
    """Whether an engine worker holds a vLLM update session that an earlier trainer left open (``open``), said when
    it joins (``Keys.open_session``): the new trainer closes such sessions before its first push."""

    open: bool = False
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class WireFp8Decision:
    """Trainer rank 0's decision, with ``wire_dtype="auto"``, whether this epoch's pushes go block FP8 (``fp8``: the
    receivers serve a block-FP8 model, plan/handshake.wants_block_fp8), read by every trainer rank
    (``Keys.WIRE_FP8``)."""

    fp8: bool = False
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class LayoutAnnouncement:
    """Trainer rank 0's decision of an epoch's transports (transport/layout.py Layout JSON), or why there is none."""

    layout: str | None = None
    error: ErrorInfo | None = None
    protocol_version: int = PROTOCOL_VERSION

    WIRE_DECODE: ClassVar[dict] = {"error": lambda e: wire.from_wire(e, ErrorInfo)}


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
    protocol_version: int = PROTOCOL_VERSION

    @property
    def failed(self) -> bool:
        return bool(self.error)


class Keys:
    """Names of the keys in the bridging group's store (one epoch's PrefixStore). ``p`` is a push's prefix."""

    LAYOUT = "layout"  # transport/layout.py: who gets which buckets by CUDA IPC
    WIRE_FP8 = "wire/fp8"  # wire_dtype "auto": rank 0's decision to send block FP8 (WireFp8Decision)

    @staticmethod
    def push(seq: int) -> str:
        """The prefix of every key of push number ``seq`` of an epoch."""
        return f"p{seq}/"

    @staticmethod
    def expected(receiver: int) -> str:
        """What a receiver expects (``Expected``; an empty one when it checks nothing), written when it joins."""
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
        """Whether a receiver's engine worker holds an update session an earlier trainer left open (``UpdateSession``,
        written by the vLLM backend when it joins; the trainer closes such sessions before its first push)."""
        return f"open-session/{receiver}"

    @staticmethod
    def served_version(receiver: int) -> str:
        """What a receiver's engine worker serves when it joins (``ServedVersion``, written by the vLLM backend)."""
        return f"served-version/{receiver}"

    @staticmethod
    def shard_ranges(receiver: int) -> str:
        """A TP worker's parts of each tensor (engines/vllm/shards.py), for its engine's other workers (plain JSON:
        between the workers of one engine, one release, never between trainer and engine)."""
        return f"shards/ranges/{receiver}"

    @staticmethod
    def shard_sums(p: str, round_: int, receiver: int) -> str:
        """A TP worker's checksum sums of its parts of one round's delta buckets (codec/delta/shards.py; plain JSON
        like ``shard_ranges``: engine-internal)."""
        return f"{p}shards/sums/{round_}/{receiver}"

    @staticmethod
    def delta_state(receiver: int) -> str:
        """What a receiver holds when it joins (``DeltaState``), and again when a late state changes (``late``); later
        states come with its acks."""
        return f"delta/state/{receiver}"

    @staticmethod
    def delta_ack(p: str, receiver: int) -> str:
        """After a delta transfer: whether the receiver applied every delta or refused one (base mismatch)."""
        return f"{p}delta/ack/{receiver}"

    @staticmethod
    def delta_stats(p: str, trainer: int) -> str:
        """A trainer rank's bytes sent / full bytes / changed elements of a push (``PushStats``)."""
        return f"{p}delta/stats/{trainer}"

    @staticmethod
    def ipc(p: str, trainer: int) -> str:
        """A trainer rank's CUDA IPC manifest of a push (transport/ipc_send.py; plain JSON: transport-internal)."""
        return f"{p}ipc/{trainer}"
