"""On-paper push time: trainer_sync's pipeline vs a checkpoint-engine-style broadcast of everything.

A small analytic model, not a network simulator. It answers "how long should one push take for this model on this
cluster" from a few rates, so that a measurement can be judged against it and a design choice (TP-aware bytes,
bucket size, overlap) can be sized before a multi-GPU machine is available. Every number it uses is an argument;
the defaults are the figures below, each labelled with where it comes from.

Figures (defaults)
------------------
Measured on one H200 (DESIGN.md; Qwen3-8B-shaped bf16, 399 tensors, 16.38 GB):
  * ``d2d_GBps = 2150``: one flat D2D copy of 16.38 GB took 7.6 ms;
  * ``h2d_GBps = 55``: pinned H2D of 16.38 GB took 0.297 s (D2H measured 0.30 s: the same rate);
  * checkpoint-engine 0.4.2 colocated ``ParameterServer.update()``: 1.00 s for 16.38 GB (world size 1, steady
    state), plus 0.30 s D2H and 0.71 s register per RL step. Taking out its H2D (0.297 s) and D2D (0.0076 s) leaves
    0.695 s for the worker's reload and per-bucket handshakes: ``ce_reload_GBps = 16.38 / 0.695 = 23.6`` (derived).
Vendor link figures (NOT measurements):
  * ``nvlink_GBps = 450``: NVLink 4 on H100/H200, per GPU per direction (900 GB/s bidirectional);
  * ``nic_GBps = 50``: one 400 Gb/s InfiniBand/RoCE NIC per GPU, 8 per node (400 GB/s per node).

Assumptions (the model)
-----------------------
 1. Weights: the model has ``model_bytes`` on the wire; ``replicated_bytes`` of them every tp rank needs whole
    (norms, MLA's q_a/kv_a projections, routers); ``kv_bytes`` are GQA k/v projections, which vLLM replicates when
    ``tp > num_kv_heads``. Everything else splits evenly over tp ranks. So one tp rank needs
    ``(model - replicated - kv) / tp + replicated + kv / min(tp, num_kv_heads)`` bytes (``tp_shards.py`` gives the
    exact figure for a real layout; this is its closed form).
 2. Placement: ``num_gpus`` inference GPUs run ``num_gpus / tp`` engine replicas, each on consecutive GPUs, nodes
    of ``gpus_per_node``. Trainer ranks are ``trainer_gpus`` separate GPUs on their own nodes, or (``trainer_gpus=0``)
    colocated: the trainer's FSDP shards live on the inference GPUs themselves, 1/num_gpus of the model each (the
    setting of checkpoint-engine's published runs). Every trainer rank holds a distinct 1/M of every tensor.
 3. Links: a collective reaches ``link_efficiency`` of the vendor figures. Traffic between GPUs of one node uses
    NVLink (per-GPU limit); traffic between nodes shares the node's NICs (``gpus_per_node * nic_GBps`` per node and
    direction, full duplex), which NCCL can use together (rails / PXN). Broadcasts are pipelined rings: each node
    receives each byte it needs once over the network, and GPUs of one node share it over NVLink.
    ``stream_cap_GBps`` (None = no cap) limits ONE broadcast that spans nodes: checkpoint-engine's published
    figures (1 TB in 21.5 s on 32 nodes, ~46 GB/s) are what a single stream moving at about one NIC's rate gives;
    they are far below what the node-aggregate assumption gives (about 3.7 s), so the report shows both.
 4. trainer_sync: every trainer rank sends only its own bytes; with TP-aware bytes each tp group receives only its
    shard (one broadcast per (trainer rank, tp group), all trainer ranks at once, so many streams share the NICs);
    without it every receiver receives everything. Stages pack (trainer, D2D rate; a dim-1 split's strided gather is
    assumed to copy at the same rate), transfer, reload (receiver copies into engine parameters: D2D rate unless
    ``reload_GBps`` says otherwise -- vLLM's layerwise reload on GPU is not measured yet) overlap with two buffers:
    over ``k`` steps of equal buckets, ``T = (P + X + L) / k + (k - 1) / k * max(P, X, L)``; without overlap
    ``T = P + X + L``. ``k`` is the buckets a trainer rank sends (``ceil(its bytes / bucket_bytes)``); each step
    also costs ``bucket_overhead_s`` (launch, wait). Weights start in GPU memory (no H2D), as an FSDP2 trainer's do.
 5. checkpoint-engine 0.4.2 broadcast (``ps.py: _update_per_bucket``): every inference GPU runs a parameter server
    holding 1/num_gpus of the model in pinned host memory; per round every rank copies its next bucket H2D (in
    parallel, not overlapped with the broadcasts); then owner by owner: D2D into the IPC buffer, broadcast to ALL
    GPUs, the worker's reload of the previous bucket overlapped with it (two IPC buffers), then an all-reduce,
    a device synchronize and a ZMQ round trip (``ce_bucket_overhead_s``). A worker's reload handles only the bytes
    its tp rank keeps (at ``ce_reload_GBps``): with the other choice (all bytes) the published 256-GPU figure could
    not be reached. Every GPU receives the whole model. Bucket size: ``ce_bucket_bytes`` (its published 256-GPU run
    used 2.99 GiB). D2H and register per RL step are reported apart (``extra_per_step_s``), as measured.
 6. Engine-side per-tensor cost (``per_tensor_s`` x ``num_tensors``, default 0: not measured yet) is added to the
    reload stage of both: vLLM's weight loaders run Python per checkpoint tensor, and a 1T MoE checkpoint has ~140k
    tensors (experts x projections x weight/scale), which every worker's ``load_weights`` sees in both designs.
 7. Not modelled: latency of store round trips and process-group setup (checkpoint-engine re-creates its process
    group on every update), stragglers, contention with generation, congestion beyond the link figures, NCCL
    communicator memory (one per (trainer rank, tp group) is 4096 communicators at 256 x TP16 -- a real run at that
    scale needs senders grouped per node or one communicator with grouped p2p; see RESULTS.md), pipeline
    parallelism, and expert parallelism (MoE experts are taken as tp-split, as vLLM does without EP).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GB = 1e9
MiB = 2**20

# Measured on one H200 (DESIGN.md).
H200_D2D_GBPS = round(16.38 / 7.6e-3)  # 16.38 GB in 7.6 ms: 2155 GB/s
H200_H2D_GBPS = round(16.38 / 0.297, 1)  # GB/s (pinned)
CE_COLOCATED_UPDATE_S = 1.00  # checkpoint-engine 0.4.2 update() for 16.38 GB on one H200
CE_D2H_S, CE_REGISTER_S = 0.30, 0.71  # per RL step, same run
CE_RELOAD_GBPS = round(16.38 / (CE_COLOCATED_UPDATE_S - 0.297 - 0.0076), 1)  # derived: 23.6 GB/s
# Vendor figures (not measured here).
NVLINK4_GBPS = 450.0  # per GPU per direction
NIC_400G_GBPS = 50.0  # 400 Gb/s per GPU, 8 per node


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nvlink_GBps: float = NVLINK4_GBPS
    nic_GBps: float = NIC_400G_GBPS
    link_efficiency: float = 1.0
    stream_cap_GBps: float | None = None  # cap on one broadcast spanning nodes (None: node NIC aggregate)
    d2d_GBps: float = H200_D2D_GBPS
    h2d_GBps: float = H200_H2D_GBPS


@dataclass(frozen=True)
class Workload:
    model_bytes: float
    num_gpus: int  # inference GPUs (receivers)
    tp: int = 1
    trainer_gpus: int = 0  # 0: colocated on the inference GPUs
    replicated_bytes: float = 0.0
    kv_bytes: float = 0.0
    num_kv_heads: int = 0  # 0: no GQA replication
    bucket_bytes: float = 256 * MiB
    num_tensors: int = 0  # checkpoint tensors (for per-tensor apply costs)

    def __post_init__(self) -> None:
        if self.model_bytes < 0 or self.num_gpus < 1 or self.tp < 1 or self.num_gpus % self.tp:
            raise ValueError(f"need model_bytes >= 0, num_gpus >= 1 and tp dividing num_gpus: {self}")
        if self.replicated_bytes + self.kv_bytes > self.model_bytes:
            raise ValueError("replicated_bytes + kv_bytes exceed model_bytes")

    @property
    def senders(self) -> int:
        return self.trainer_gpus or self.num_gpus

    def kv_copies(self) -> int:
        """How many tp ranks share one kv head's bytes (1 = no replication)."""
        return max(1, self.tp // self.num_kv_heads) if self.num_kv_heads else 1

    def bytes_per_tp_rank(self) -> float:
        """Bytes one tp rank needs (assumption 1)."""
        split = self.model_bytes - self.replicated_bytes - self.kv_bytes
        return split / self.tp + self.replicated_bytes + self.kv_bytes * self.kv_copies() / self.tp

    def tp_total_bytes(self) -> float:
        """Bytes the trainer puts on the wire for one push with TP-aware bytes (sum over tp groups)."""
        return self.bytes_per_tp_rank() * self.tp


@dataclass(frozen=True)
class SyncRates:
    """trainer_sync's per-stage rates (GB/s) and per-step cost; None = the hardware's D2D rate."""

    pack_GBps: float | None = None
    reload_GBps: float | None = None
    bucket_overhead_s: float = 100e-6
    per_tensor_s: float = 0.0  # engine-side cost per tensor applied (Python weight loaders); not measured yet
    weights_on_host: bool = False  # True: the trainer's weights start in host memory (adds H2D to packing)
    # Delta pushes (issue 16): bytes on the wire over a full push's (bench_delta_push.py measures it per learning
    # rate), and the encode's extra passes over the sender's bytes at the pack rate (compare, nonzero, gathers;
    # an assumption: 3 passes) plus the receiver's base check (one read of its bytes at the reload rate).
    wire_fraction: float = 1.0
    encode_passes: float = 3.0


@dataclass(frozen=True)
class CeRates:
    """checkpoint-engine's per-stage figures (assumption 5)."""

    bucket_bytes: float = 2.99 * 2**30
    reload_GBps: float = CE_RELOAD_GBPS
    bucket_overhead_s: float = 1e-3
    per_tensor_s: float = 0.0  # as SyncRates.per_tensor_s: every worker's load_weights sees every tensor
    register_GBps: float = round(16.38 / CE_REGISTER_S, 1)  # measured: 0.71 s per 16.38 GB


@dataclass
class Estimate:
    seconds: float
    bytes_per_gpu: float  # received by each inference GPU
    stages: dict[str, float]  # stage totals in seconds (before overlap)
    bottleneck: str
    steps: int
    extra_per_step_s: float = 0.0  # outside the push itself (checkpoint-engine's D2H + register)
    notes: list[str] = field(default_factory=list)

    @property
    def receive_GBps(self) -> float:
        return self.bytes_per_gpu / self.seconds / GB if self.seconds > 0 else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d["receive_GBps"] = round(self.receive_GBps, 2)
        d["seconds"] = round(self.seconds, 4)
        d["stages"] = {k: round(v, 4) for k, v in self.stages.items()}
        return d


def pipeline_seconds(stage_totals: list[float], steps: int, overlap: bool = True) -> float:
    """Time for ``steps`` equal buckets through stages whose totals are ``stage_totals`` (assumption 4).

    Overlapped: the first bucket goes through every stage, each further one adds the slowest stage's share.
    """
    total = sum(stage_totals)
    if not overlap or steps <= 1:
        return total
    return total / steps + (steps - 1) / steps * max(stage_totals)


def _nodes(n: int, per: int) -> int:
    return -(-n // per)


def transfer_seconds(w: Workload, hw: Hardware, tp_aware: bool) -> tuple[float, str]:
    """Network time of trainer_sync's transfers for one push, and which resource bounds it (assumption 3)."""
    g, eff = hw.gpus_per_node, hw.link_efficiency
    per_gpu = w.bytes_per_tp_rank() if tp_aware else w.model_bytes
    sent = w.tp_total_bytes() if tp_aware else w.model_bytes  # distinct bytes per group, summed over groups
    m = w.senders
    colocated = w.trainer_gpus == 0
    single_node = (w.num_gpus <= g) if colocated else (w.num_gpus + m <= g)
    bounds = {
        # every inference GPU takes its bytes in over NVLink (from a sender or a ring neighbour on its node)
        "nvlink ingress per GPU": per_gpu / (hw.nvlink_GBps * eff * GB),
        # every trainer rank sends its 1/M of each group's bytes once (ring: the receivers forward)
        "sender egress per GPU": sent / m / (hw.nvlink_GBps * eff * GB),
    }
    if not single_node:
        nic_node = g * hw.nic_GBps * eff * GB
        # distinct tp ranks on one inference node: consecutive engine ranks, so min(g, tp) of them
        ranks_on_node = min(g, w.tp)
        need = per_gpu * ranks_on_node if tp_aware else w.model_bytes
        local = (min(g, w.num_gpus) / w.num_gpus) if colocated else 0.0  # share produced on the node itself
        bounds["node NIC ingress"] = need * (1 - local) / nic_node
        sender_nodes = _nodes(m, g) if not colocated else _nodes(w.num_gpus, g)
        bounds["node NIC egress (senders)"] = sent / sender_nodes * (1 - local) / nic_node
        if hw.stream_cap_GBps:
            # each trainer rank's streams run one after another (one CUDA stream per rank)
            bounds["one stream per sender"] = sent / m / (hw.stream_cap_GBps * GB)
    name = max(bounds, key=bounds.get)
    return bounds[name], name


def simulate_trainer_sync(w: Workload, hw: Hardware = Hardware(), rates: SyncRates = SyncRates(),
                          tp_aware: bool = True, overlap: bool = True) -> Estimate:
    pack = (rates.pack_GBps or hw.d2d_GBps) * GB
    reload = (rates.reload_GBps or hw.d2d_GBps) * GB
    per_gpu = w.bytes_per_tp_rank() if tp_aware else w.model_bytes
    per_sender = (w.tp_total_bytes() if tp_aware else w.model_bytes) / w.senders
    steps = max(1, math.ceil(per_sender / w.bucket_bytes))
    x, bound = transfer_seconds(w, hw, tp_aware)
    p = per_sender / pack + (per_sender / (hw.h2d_GBps * GB) if rates.weights_on_host else 0.0)
    f = rates.wire_fraction
    delta = f < 1.0
    if delta:  # deltas: fewer bytes on the wire and written, an encode on the sender and a base check on receivers
        x *= f
        p += rates.encode_passes * per_sender / pack
    stages = {"pack": p, "transfer": x + steps * rates.bucket_overhead_s,
              "reload": per_gpu * (f + (1.0 if delta else 0.0)) / reload + w.num_tensors * rates.per_tensor_s}
    t = pipeline_seconds(list(stages.values()), steps, overlap)
    slowest = max(stages, key=stages.get)
    return Estimate(t, per_gpu, stages, f"{slowest} ({bound})" if slowest == "transfer" else slowest, steps,
                    notes=[f"{'TP-aware' if tp_aware else 'every receiver gets the whole model'}, "
                           f"{w.senders} trainer ranks {'colocated' if not w.trainer_gpus else 'on separate GPUs'}, "
                           f"{'overlapped' if overlap else 'serial'} stages"])


def simulate_checkpoint_engine(w: Workload, hw: Hardware = Hardware(), rates: CeRates = CeRates()) -> Estimate:
    """checkpoint-engine 0.4.2's broadcast update (assumption 5): every GPU gets everything."""
    n, g, eff = w.num_gpus, hw.gpus_per_node, hw.link_efficiency
    own = w.model_bytes / n
    rounds = max(1, math.ceil(own / rates.bucket_bytes))
    buckets = rounds * n
    if n == 1:
        bcast_rate = math.inf  # a broadcast in a world of one moves nothing
    elif n <= g:
        bcast_rate = hw.nvlink_GBps * eff * GB
    else:
        bcast_rate = min(hw.nvlink_GBps * eff, g * hw.nic_GBps * eff) * GB
        if hw.stream_cap_GBps:
            bcast_rate = min(bcast_rate, hw.stream_cap_GBps * GB)
    keep = w.bytes_per_tp_rank() / w.model_bytes if w.model_bytes else 0.0  # share a worker keeps (1/tp-ish)
    h2d = rounds * min(own, rates.bucket_bytes) / (hw.h2d_GBps * GB)
    d2d = w.model_bytes / (hw.d2d_GBps * GB)
    bcast = w.model_bytes / bcast_rate
    reload = w.model_bytes * keep / (rates.reload_GBps * GB) + w.num_tensors * rates.per_tensor_s
    # per bucket: max(broadcast, reload of the previous bucket); equal buckets -> max of the totals, plus the last
    # bucket's reload that nothing hides
    overlapped = max(bcast, reload) + min(bcast, reload) / buckets
    overhead = buckets * rates.bucket_overhead_s
    t = h2d + d2d + overlapped + overhead
    stages = {"h2d": h2d, "d2d": d2d, "broadcast": bcast, "reload": reload, "per_bucket_sync": overhead}
    extra = own / (hw.h2d_GBps * GB) + own / (rates.register_GBps * GB)
    return Estimate(t, w.model_bytes, stages, max(stages, key=stages.get), buckets, extra,
                    notes=[f"{n} GPUs, {rounds} round(s) of {n} buckets, broadcast at "
                           f"{'n/a' if math.isinf(bcast_rate) else round(bcast_rate / GB, 1)} GB/s"])


# ---- named workloads -----------------------------------------------------------------------------------------

def llama_bytes(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, vocab: int,
                tied: bool = False, dtype_bytes: float = 2.0) -> dict:
    """Byte counts of a Llama/Qwen3-style dense model (the shapes ``tp.llama_layout`` plans)."""
    q, kv = heads * head_dim * hidden, 2 * kv_heads * head_dim * hidden
    o, mlp = hidden * heads * head_dim, 3 * inter * hidden
    norms = layers * (2 * hidden + 2 * head_dim) + hidden
    embed = vocab * hidden * (1 if tied else 2)
    total = (layers * (q + kv + o + mlp) + embed) * dtype_bytes + norms * dtype_bytes
    return {"model_bytes": total, "replicated_bytes": norms * dtype_bytes, "kv_bytes": layers * kv * dtype_bytes,
            "num_kv_heads": kv_heads}


QWEN3_8B = {**llama_bytes(36, 4096, 32, 8, 128, 12288, 151936), "num_tensors": 399}  # 16.38 GB bf16
QWEN3_32B = {**llama_bytes(64, 5120, 64, 8, 128, 25600, 151936), "num_tensors": 707}  # 65.5 GB bf16
# A 1T-parameter FP8 MoE (Kimi-K2 / DeepSeek-V3 shape: 61 layers, hidden 7168, MLA, 384 experts): ~1 byte per
# parameter plus 128x128 float32 scales (+0.02%). Replicated per tp rank (estimated from the public config): MLA's
# q_a_proj [1536, 7168] and kv_a_proj_with_mqa [576, 7168] in fp8, routers [384, 7168] and norms -> ~1.1 GB.
# Tensors: 60 MoE layers x (384 experts x 3 projections x weight/scale + ~22 others) + ~40 -> ~140k.
KIMI_K2_FP8 = {"model_bytes": 1.0e12, "replicated_bytes": 1.1e9, "kv_bytes": 0.0, "num_kv_heads": 0,
               "num_tensors": 140_000}


def compare(w: Workload, hw: Hardware = Hardware(), sync: SyncRates = SyncRates(), ce: CeRates = CeRates()) -> dict:
    """trainer_sync (TP-aware and not, overlapped and serial) and checkpoint-engine on one workload."""
    out = {
        "trainer_sync_tp_aware": simulate_trainer_sync(w, hw, sync, tp_aware=True).to_dict(),
        "trainer_sync_full": simulate_trainer_sync(w, hw, sync, tp_aware=False).to_dict(),
        "trainer_sync_tp_aware_serial": simulate_trainer_sync(w, hw, sync, tp_aware=True, overlap=False).to_dict(),
        "checkpoint_engine": simulate_checkpoint_engine(w, hw, ce).to_dict(),
    }
    out["speedup_vs_checkpoint_engine"] = round(out["checkpoint_engine"]["seconds"] /
                                                out["trainer_sync_tp_aware"]["seconds"], 2)
    return out
