"""SyncConfig: every knob of a weight sync in one dataclass.

Defaults work with no arguments: a user should be able to write ``SyncConfig()`` and get a correct, reasonably fast
sync. Each field says why its default is what it is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the codec is a layer above; a config only names its rules
    from .codec import Fp8Rules

TOKEN_ENV = "TRAINER_SYNC_TOKEN"

WIRE_DTYPES = ("auto", "model", "float32", "bfloat16", "float16", "fp8")
MODES = ("auto", "broadcast", "ipc", "p2p")


@dataclass
class SyncConfig:
    # Bytes per bucket. 256 MB saturates NVLink/IB with few collectives and stays small next to a GPU's memory;
    # on CPU gloo the rate is flat above a few MB, so any value above that is fine.
    bucket_mb: float = 256.0
    # "auto": the dtype each receiver expects (so an fp32 master copy is cast to the engine's bf16 while packing);
    # "model": the trainer's own dtype; or an explicit dtype; "fp8": block-quantized e4m3 (see codec/fp8.py).
    wire_dtype: str = "auto"
    # "broadcast" for a static cluster; "ipc" when engines share GPUs with trainer ranks; "auto" picks per hop: CUDA
    # IPC between a trainer rank and a receiver on one GPU, the bridging group otherwise (transport/layout.py).
    mode: str = "auto"
    # mode "ipc": let receivers read the trainer's parameters in place when every tensor travels whole in its own
    # dtype (one copy of each byte, by the engine); False always packs into exported bucket buffers first.
    ipc_direct: bool = True
    # How a vLLM engine applies a push: "auto" copies each tensor straight into its place in the live model once the
    # engine has learned and proven those places on one push through vLLM's layerwise reload (only for models whose
    # layers do nothing after loading: unquantized, on GPU; engines/vllm/placement.py); "layerwise" always reloads.
    engine_apply: str = "auto"
    # Which tensors go block-FP8 when wire_dtype is "fp8" (codec.Fp8Rules; None: its defaults: 2-D linear weights,
    # no embeddings, no lm_head, no norms/gates). Sent to the receivers in their JoinInfo, so both sides agree.
    fp8_rules: "Fp8Rules | None" = None
    # torch.distributed backend of the bridging group: None picks nccl for CUDA tensors and gloo otherwise.
    backend: str | None = None
    # Rendezvous: the TCPStore lives on trainer rank 0. Port 0 picks a free port (shared with the other trainer ranks
    # through the trainer's default process group).
    host: str = "127.0.0.1"
    port: int = 0
    # Shared secret checked at rendezvous. None reads TRAINER_SYNC_TOKEN, and if that is unset too a random token is
    # made on trainer rank 0 (fine when trainer_sync also starts the receivers, as WeightSync does).
    token: str | None = None
    # Seconds any single wait may take (rendezvous, handshake, one bucket, the receivers' acknowledgement).
    timeout_s: float = 120.0
    # Tighter caps where wanted: one bucket on the wire (a stalled peer is named after this long), and a whole push
    # (handshake + transfer + acknowledgements). None: timeout_s per wait, no cap on the whole.
    bucket_timeout_s: float | None = None
    push_timeout_s: float | None = None
    # Buffers per side: 2 overlaps pack/transfer/apply; 1 halves buffer memory and serializes the stages.
    num_buffers: int = 2
    # Cap on the bytes of transfer buffers per process (None: no cap). When short, buckets shrink or the pipeline
    # falls back to one buffer; the report says so.
    memory_budget_mb: float | None = None
    # Keep this rank's share of the latest complete version in (pinned) host memory so that engines joining later
    # can pull it point to point without the trainer's GPUs or its training step (catchup.py). Off by default: it
    # costs one extra copy of the model across the trainer ranks. keep_latest_mb caps it per rank.
    keep_latest: bool = False
    keep_latest_mb: float | None = None
    # Refuse to push weights holding NaN/Inf (checked on the trainer before any byte moves).
    check_finite: bool = False
    # Generation pause mode while an engine updates: "keep" (freeze requests, resume after), "wait", "abort".
    pause_mode: str = "keep"
    # Directory for TensorBoard event files; None disables logging.
    tb_dir: str | None = None
    # Receiver-side names: a mapping from trainer names (after unwrapping DDP/FSDP/compile prefixes) to the names
    # the engine expects. Unmapped names pass through.
    rename: dict[str, str] = field(default_factory=dict)
    # Delta pushes (codec/delta/codec.py): "auto" sends each bucket as the smallest of full values, a
    # changed-element bitmask + values, or changed-element indices + values, whenever every receiver holds the
    # trainer's last acknowledged version (else the push goes full and SyncReport.full_reason says why); "off"
    # always sends full. CUDA IPC hops always go full (a same-GPU copy gains nothing from a delta).
    delta: str = "auto"
    # Cap on the trainer-side cache of this rank's last pushed wire bytes (one wire-dtype copy of its shard, on the
    # device of its parameters); buckets past the cap always go full. None: no cap.
    delta_cache_mb: float | None = None
    # Cap on a receiver's host mirror of the last version (one wire-dtype copy of the model per receiver, kept by
    # receivers that hand whole tensors to their engine, e.g. vLLM's layerwise reload); a receiver whose mirror
    # would not fit takes full pushes. None: no cap. Receivers given ``targets`` keep no mirror.
    delta_mirror_mb: float | None = None

    # A PEFT LoRA model (issue 27): "adapter" pushes only the adapter's A/B (megabytes) into engines started with
    # LoRA, which install it in memory as the new version of one adapter (WeightSync.lora_request() names it for
    # generate); "merged" pushes base + scaling * B @ A of the adapted modules only (the base on the first push) into
    # engines without LoRA; "auto" takes adapter mode when every engine has LoRA enabled, merged otherwise (the
    # report's ``lora`` / ``lora_reason`` say which and why). Ignored for a model without a LoRA adapter.
    lora: str = "auto"
    # The adapter's name and integer id in the engines (the same for every version; id None: one derived from the
    # name). Pick another name for each trainer whose adapters share an engine.
    lora_name: str = "trainer_sync"
    lora_id: int | None = None

    def __post_init__(self) -> None:
        if self.bucket_mb <= 0:
            raise ValueError(f"SyncConfig.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"SyncConfig.wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"SyncConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.engine_apply not in ("auto", "layerwise"):
            raise ValueError(f"SyncConfig.engine_apply must be auto or layerwise, got {self.engine_apply!r}")
        if self.num_buffers not in (1, 2):
            raise ValueError(f"SyncConfig.num_buffers must be 1 or 2, got {self.num_buffers}")
        for name in ("timeout_s", "bucket_timeout_s", "push_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SyncConfig.{name} must be > 0, got {value}")
        if self.fp8_rules is not None and not hasattr(self.fp8_rules, "eligible"):
            raise TypeError(f"SyncConfig.fp8_rules must be a trainer_sync.codec.Fp8Rules or None, got "
                            f"{type(self.fp8_rules).__name__}")
        if self.delta not in ("auto", "off"):
            raise ValueError(f"SyncConfig.delta must be auto or off, got {self.delta!r}")
        for name in ("delta_cache_mb", "delta_mirror_mb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"SyncConfig.{name} must be >= 0 or None, got {value}")
        if self.lora not in ("auto", "adapter", "merged"):
            raise ValueError(f"SyncConfig.lora must be auto, adapter or merged, got {self.lora!r}")
        if not self.lora_name:
            raise ValueError("SyncConfig.lora_name must not be empty")
        if self.lora_id is not None and self.lora_id < 1:
            raise ValueError(f"SyncConfig.lora_id must be >= 1 or None, got {self.lora_id}")
        if self.pause_mode not in ("keep", "wait", "abort"):
            raise ValueError(f"SyncConfig.pause_mode must be keep, wait or abort, got {self.pause_mode!r}")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)

    @property
    def delta_cache_bytes(self) -> int | None:
        return None if self.delta_cache_mb is None else int(self.delta_cache_mb * 2**20)

    @property
    def lora_int_id(self) -> int:
        """The adapter's integer id in the engines: ``lora_id``, or a stable one from ``lora_name``."""
        import zlib

        return self.lora_id if self.lora_id is not None else zlib.crc32(self.lora_name.encode()) % (2**31 - 2) + 1

    def resolved_token(self) -> str | None:
        return self.token if self.token is not None else os.environ.get(TOKEN_ENV)
