"""The handshake's checks: what trainer rank 0 compares with each receiver's ``Expected`` before a byte moves.

Why apart from buckets.py: bucket planning is pure geometry (which bytes go where) and needs nothing of the
receivers; this is the agreement with them: the dtype each tensor travels in (``resolve_wire_dtypes``, and
``wants_block_fp8`` for ``wire_dtype="auto"``), the mismatch lines of a refused plan (``check_plan``), and the
model facts that no tensor shape shows (``model_facts`` / ``check_model``: a mixture-of-experts model's routing).
Pure functions of metadata, unit-tested without processes.
"""
from __future__ import annotations

from ..protocol.messages import SCALE_SUFFIX, Expected
from .buckets import BucketPlan, WireTensor, dtype_of


def wants_block_fp8(expected: list[Expected]) -> bool:
    """``wire_dtype="auto"``: whether the receivers serve a block-FP8 model (float8 ``x.weight`` with a
    ``x.weight_scale_inv``), so that the trainer sends fp8 + scales in checkpoint format. Only when every receiver
    that states expectations does: a fleet mixing FP8 and bf16 engines gets the handshake's mismatch list instead."""
    stated = [e for e in expected if e.tensors]

    def fp8(e: Expected) -> bool:
        return any(d is not None and d.startswith("float8") and n + SCALE_SUFFIX in e.tensors
                   for n, (_, d) in e.tensors.items())

    return bool(stated) and all(fp8(e) for e in stated)


def resolve_wire_dtypes(
    meta: dict[str, tuple[tuple[int, ...], str]], wire_dtype: str, expected: list[Expected]
) -> dict[str, str]:
    """The dtype each tensor travels in.

    "model" keeps the trainer's dtype; an explicit dtype applies to floating tensors; "auto" takes the dtype the
    receivers expect for floating tensors (an fp32 master copy reaches a bf16 engine as bf16, packed on the trainer)
    and the trainer's dtype where receivers name none. Integer tensors never change dtype.
    """
    out = {}
    for name, (_, dtype) in meta.items():
        floating = dtype_of(dtype).is_floating_point
        if wire_dtype == "model" or not floating:
            out[name] = dtype
        elif wire_dtype in ("auto", "fp8"):
            # "fp8": the source (codec/fp8_source.py) already presents eligible weights as float8 + float32 scales; the
            # rest goes as in "auto". A cast to or from float8 is never implicit (it needs scales): keep the dtype
            # and let the handshake name the mismatch.
            wanted = {e.tensors[name][1] for e in expected if name in e.tensors and e.tensors[name][1]}
            want = next(iter(wanted)) if len(wanted) == 1 else None
            ok = want and dtype_of(want).is_floating_point and dtype_of(want).itemsize > 1 and \
                dtype_of(dtype).itemsize > 1
            out[name] = want if ok else dtype
        else:
            out[name] = wire_dtype
    return out


def check_plan(plan: BucketPlan, expected: Expected, who: str, partial: bool = False,
               ignore: frozenset[str] = frozenset()) -> list[str]:
    """Every mismatch between what the plan sends and what one receiver expects, one line each.

    Names the receiver. Tied aliases count as sent. An empty list means the receiver accepts the plan. ``partial``:
    the push updates some tensors only (a LoRA merged push), so none counts as missing; ``ignore``: tensors checked
    elsewhere (a LoRA adapter's, against the engine's LoraSupport).
    """
    sent: dict[str, WireTensor] = {}
    for t in plan.tensors.values():
        sent[t.name] = t
        for a in t.aliases:
            sent.setdefault(a, t)
    errors = []
    if not expected.tensors:
        # No tensor list: an engine without a safetensors checkpoint (dummy weights, a .bin checkpoint) that still
        # states its model facts (an MoE's routing). Names and shapes go unchecked there, as with no Expected.
        return errors
    for name, (shape, dtype) in expected.tensors.items():
        t = sent.get(name)
        if t is None:
            if partial:
                continue
            errors.append(f"{who}: missing {name} (expected {list(shape)} {dtype})")
            continue
        if tuple(t.shape) != tuple(shape):
            errors.append(f"{who}: wrong shape for {name}: sent {list(t.shape)}, expected {list(shape)}")
        if dtype is not None and t.dtype != dtype:
            errors.append(f"{who}: wrong dtype for {name}: sent {t.dtype}, expected {dtype}")
    for name in plan.tensors:
        if name in ignore:
            continue
        if name not in expected.tensors and not any(a in expected.tensors for a in plan.tensors[name].aliases):
            errors.append(f"{who}: unexpected {name} {list(plan.tensors[name].shape)} {plan.tensors[name].dtype}")
    return errors


# Config fields that decide what a model computes but show in no tensor's shape: a mixture-of-experts layer's routing
# (Qwen3-MoE / Qwen2-MoE / Mixtral names, then DeepSeek's). The expert count and width do show in shapes (the router
# gate [experts, hidden], each expert's [width, hidden]) and are named again here for a clearer refusal.
MODEL_FACTS = {
    "num_experts": "experts per MoE layer",
    "num_local_experts": "experts per MoE layer",
    "n_routed_experts": "routed experts per MoE layer",
    "num_experts_per_tok": "experts routed per token (top-k)",
    "moe_intermediate_size": "expert width",
    "norm_topk_prob": "whether the top-k routing weights are renormalized",
    "n_shared_experts": "shared experts per MoE layer",
    "n_group": "expert groups",
    "topk_group": "expert groups routed per token",
}


def model_facts(config) -> dict:
    """The MODEL_FACTS a model config (transformers' PretrainedConfig, or vLLM's hf_config) sets, as plain data."""
    out = {}
    for key in MODEL_FACTS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def check_model(trainer: dict, expected: Expected, who: str) -> list[str]:
    """One line per architecture fact the trainer's model and a receiver's model both state and disagree on."""
    return [f"{who}: model config {key} ({MODEL_FACTS.get(key, key)}): trainer {trainer[key]!r}, engine "
            f"{expected.model[key]!r}"
            for key in sorted(set(trainer) & set(expected.model)) if trainer[key] != expected.model[key]]
