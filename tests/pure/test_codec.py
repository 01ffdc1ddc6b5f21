"""FP8 block codec: exact against an independent numpy reference, error bound, eligibility, names, bytes.

Fast, no processes. The reference below uses numpy only (torch makes inputs and is read back bit for bit): float32
amax per block, float32 scale, float32 division, and rounding to e4m3fn through a table of its codes.
"""
import math

import numpy as np
import pytest
import torch

from trainer_sync.codec import (FP8_NAME, Fp8Arrival, Fp8Dequantizer, Fp8Rules, block_amax, dequantize_fp8_blocks,
                                fp8_eligible, fp8_wire_expected, fp8_wire_nbytes, quantize_fp8_blocks,
                                quantize_with_scales, scale_name, scale_shape)
from tests.helpers.fp8_roles import TinyLM
from tests.helpers.tensors import bits
from trainer_sync.plan.buckets import plan_buckets
from trainer_sync.plan.handshake import check_plan
from trainer_sync.protocol.messages import Expected
from trainer_sync.sources import ModuleSource
from trainer_sync.codec.fp8_source import Fp8Source

# ---------------------------------------------------------------------------------------------- numpy reference


def e4m3_values() -> np.ndarray:
    """Values of the finite non-negative e4m3fn codes 0..126 (127 = 0x7f is NaN), exact in float64, ascending."""
    codes = np.arange(127)
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e - 7))


E4M3 = e4m3_values()


def ref_e4m3_codes(x: np.ndarray) -> np.ndarray:
    """Round float32 ``x`` to e4m3fn codes: nearest, ties to the even code, saturating at 448, sign kept."""
    ax = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(E4M3, ax, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    dlo, dhi = ax - E4M3[lo], E4M3[hi] - ax
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (pick.astype(np.uint8) | (np.signbit(x).astype(np.uint8) << 7)).astype(np.uint8)


def ref_e4m3_decode(codes: np.ndarray) -> np.ndarray:
    mag = E4M3[np.minimum(codes & 0x7F, 126)]
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


def to_np32(t: torch.Tensor) -> np.ndarray:
    """Exact float32 values of a bf16/fp16/fp32 tensor, decoded from its bits (no torch arithmetic)."""
    if t.dtype == torch.bfloat16:
        u = t.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
        return (u << 16).view(np.float32)
    if t.dtype == torch.float16:
        return t.contiguous().view(torch.int16).numpy().view(np.float16).astype(np.float32)
    return t.contiguous().numpy().astype(np.float32)


def ref_quantize(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    out, inp = w.shape
    nr, nc = -(-out // block), -(-inp // block)
    padded = np.zeros((nr * block, nc * block), np.float32)
    padded[:out, :inp] = np.abs(w)
    amax = padded.reshape(nr, block, nc, block).max(axis=(1, 3))
    scale = np.maximum(amax / np.float32(448.0), np.float32(2.0 ** -126)).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:out, :inp]
    return ref_e4m3_codes((w / full).astype(np.float32)), scale


def ref_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---------------------------------------------------------------------------------------------- inputs


def wide(shape, dtype, seed=0):
    """Random values spanning many binades per block (columns scaled over 6 decades), both signs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[1])
    return w.to(dtype)


def special(dtype):
    """Zero blocks (+0 and -0), a tiny-amax block, huge values, exact e4m3 ties, edge blocks of 3 and 44 elements."""
    w = wide((259, 300), torch.float32, seed=3)
    w[:128, :128] = 0.0  # all-zero block
    w[128:256, :128] = -0.0  # all negative-zero block
    w[:128, 128:256] *= 1e-41 if dtype != torch.float16 else 1e-3  # tiny amax: scale floors at 2**-126
    w[128:256, 128:256] *= 1e30 if dtype != torch.float16 else 1e1  # large magnitudes
    # A block with amax exactly 448 (scale_inv 1.0), so these values hit e4m3 rounding ties exactly.
    ties = [448.0, 1.0625, 1.1875, 2 ** -10, 3 * 2 ** -10, -2 ** -10, 17.0, 19.0, -19.0, 2 ** -7 + 2 ** -10, 0.5]
    w[256:259, 256:300] = 0.0
    w[256, 256:256 + len(ties)] = torch.tensor(ties)
    return w.to(dtype)


SHAPES = [(1, 1), (129, 255), (300, 128), (128, 128), (257, 129), (2, 700), (256, 384)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ---------------------------------------------------------------------------------------------- exactness


def check_exact(w: torch.Tensor) -> None:
    q, s = quantize_fp8_blocks(w, backend="torch")
    codes, scale = ref_quantize(to_np32(w))
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == tuple(w.shape)
    assert s.dtype == torch.float32 and tuple(s.shape) == scale_shape(w.shape)
    np.testing.assert_array_equal(bits(s), scale.view(np.int32))
    got = bits(q)
    bad = np.argwhere(got != codes)
    assert bad.size == 0, [(tuple(i), float(to_np32(w)[tuple(i)]), int(got[tuple(i)]), int(codes[tuple(i)]))
                           for i in bad[:5]]
    # dequantize: fl32(q * s), then the wanted dtype
    deq_ref = ref_e4m3_decode(codes) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    np.testing.assert_array_equal(bits(dequantize_fp8_blocks(q, s, torch.float32)), deq_ref.view(np.int32))
    np.testing.assert_array_equal(bits(dequantize_fp8_blocks(q, s, torch.bfloat16)).view(np.uint16),
                                  ref_bf16(deq_ref))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_and_scales_match_reference(shape, dtype):
    check_exact(wide(shape, dtype, seed=hash(shape) % 1000))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_blocks_match_reference(dtype):
    w = special(dtype)
    check_exact(w)
    q, s = quantize_fp8_blocks(w)
    assert float(s[0, 0]) == 2.0 ** -126 and float(s[1, 0]) == 2.0 ** -126  # the zero-block rule
    deq = dequantize_fp8_blocks(q, s, torch.float32)
    assert torch.equal(deq[:256, :128], torch.zeros(256, 128))  # zero blocks come back exactly zero ...
    assert bool(torch.signbit(deq[128:256, :128]).all())  # ... of the input's sign
    assert float(s[2, 2]) == 1.0
    row = bits(q)[256, 256:267]
    # 448 -> 0x7e; ties to even: 1.0625 -> 1.0, 1.1875 -> 1.25, 2^-10 -> 0, 3*2^-10 -> 2^-8, -2^-10 -> -0,
    # 17 -> 16, 19 -> 20, 2^-7 + 2^-10 -> 2^-7 (subnormal tie), 0.5 exact
    want = [0x7E, 0x38, 0x3A, 0x00, 0x02, 0x80, 0x58, 0x5A, 0xDA, 0x04, 0x30]
    assert list(row) == want


def test_all_zero_and_tiny_inputs():
    for w in (torch.zeros(1, 1), torch.zeros(129, 255, dtype=torch.bfloat16), torch.full((3, 5), 1e-40)):
        check_exact(w)
        q, s = quantize_fp8_blocks(w)
        assert bool(torch.isfinite(s).all()) and bool((s >= 2.0 ** -126).all())
        assert bool(torch.isfinite(dequantize_fp8_blocks(q, s, torch.float32)).all())


def test_non_contiguous_and_empty():
    w = wide((300, 140), torch.bfloat16).t()  # [140, 300], non-contiguous
    check_exact(w)
    q, s = quantize_fp8_blocks(torch.empty(0, 5))
    assert q.shape == (0, 5) and s.shape == (0, 1)


# ---------------------------------------------------------------------------------------------- error bound


def error_bound(w: np.ndarray, scale_full: np.ndarray) -> np.ndarray:
    """|w - deq| <= s * max(2^(floor(log2|w/s|) - 4), 2^-10) + 2^-22 |w| + 2^-149 (see codec.py's docstring)."""
    v = np.abs(w.astype(np.float64)) / scale_full
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.maximum(v, 2.0 ** -30)))
    half_spacing = np.where(v >= 2.0 ** -6, 2.0 ** (e - 4), 2.0 ** -10)
    return scale_full * half_spacing + 2.0 ** -22 * np.abs(w.astype(np.float64)) + 2.0 ** -149


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_within_e4m3_bound(dtype):
    for w in (wide((300, 700), dtype, seed=7), special(dtype)):
        q, s = quantize_fp8_blocks(w)
        deq = to_np32(dequantize_fp8_blocks(q, s, torch.float32)).astype(np.float64)
        w64 = to_np32(w).astype(np.float64)
        sf = np.repeat(np.repeat(to_np32(s).astype(np.float64), 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
        err = np.abs(w64 - deq)
        assert (err <= error_bound(to_np32(w), sf)).all()
        # per block: at most half the top binade's spacing, 16 * scale = amax / 28
        assert (err <= 16 * sf * (1 + 2.0 ** -20) + 2.0 ** -149).all()
        # relative: at most 2^-4 wherever |w/s| is in e4m3's normal range
        normal = np.abs(w64) >= 2.0 ** -6 * sf
        assert (err[normal] <= 2.0 ** -4 * np.abs(w64[normal]) * (1 + 2.0 ** -20)).all()


# ---------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("cuts", [(77, 200), (128, 256), (0, 150), (299, 300)])
def test_dim0_shards_agree_on_block_scales(cuts):
    """FSDP dim-0 shards: max over the shards' partial block amax = the full amax; each shard's rows quantized
    with the agreed scales are the full tensor's codes (an empty shard included)."""
    w = wide((300, 200), torch.bfloat16, seed=11)
    bounds = [0, *cuts, 300]
    shards = [(w[a:b], a) for a, b in zip(bounds, bounds[1:])]
    amax = torch.stack([block_amax(x, row_offset=a, total_rows=300) for x, a in shards]).amax(0)
    assert torch.equal(amax, block_amax(w))
    q, s = quantize_fp8_blocks(w)
    s2 = torch.div(amax, 448.0).clamp_min(2.0 ** -126)
    assert torch.equal(s, s2)
    parts = [quantize_with_scales(x, s2, row_offset=a) for x, a in shards]
    assert np.array_equal(bits(torch.cat(parts)), bits(q))


# ---------------------------------------------------------------------------------------------- eligibility


def test_eligibility_rules():
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.gate_proj.weight",
           "model.layers.3.mlp.down_proj.weight", "model.layers.0.mlp.experts.7.up_proj.weight", "0.weight", "weight"]
    for name in yes:
        assert fp8_eligible(name, (256, 128), "bfloat16"), name
    no = [("model.layers.0.self_attn.q_norm.weight", (128,)), ("model.layers.0.input_layernorm.weight", (4096,)),
          ("model.embed_tokens.weight", (1000, 64)), ("lm_head.weight", (1000, 64)),
          ("transformer.wte.weight", (1000, 64)), ("model.layers.0.mlp.gate.weight", (8, 64)),
          ("model.layers.0.self_attn.q_proj.bias", (64,)), ("model.layers.0.mlp.experts.w1", (8, 64, 64)),
          ("conv.weight", (8, 3, 3, 3)), ("model.layers.0.self_attn.q_proj.weight", (0, 64))]
    for name, shape in no:
        assert not fp8_eligible(name, shape, "bfloat16"), name
    assert not fp8_eligible("a.weight", (64, 64), "int32")
    assert not fp8_eligible("a.weight", (64, 64), FP8_NAME)
    assert fp8_eligible("lm_head.weight", (1000, 64), rules=Fp8Rules(include_lm_head=True))
    assert fp8_eligible("model.embed_tokens.weight", (1000, 64), rules=Fp8Rules(include_embeddings=True))
    assert not fp8_eligible("model.layers.0.self_attn.k_proj.weight", (64, 64),
                            rules=Fp8Rules(exclude=(r"\.k_proj\.",)))


# ---------------------------------------------------------------------------------------------- names, plan, bytes


def test_fp8_source_names_shapes_and_round_trip():
    model = TinyLM()
    src = Fp8Source(ModuleSource(model))
    pieces = {p.name: p for p in src.pieces()}
    params = dict(model.named_parameters())
    eligible = {n for n, p in params.items() if fp8_eligible(n, p.shape, p.dtype)}
    assert len(eligible) == 2 * 7
    assert set(pieces) == set(params) | {scale_name(n) for n in eligible}
    for n, p in params.items():
        if n in eligible:
            assert (pieces[n].shape, pieces[n].dtype) == (tuple(p.shape), FP8_NAME)
            sp = pieces[scale_name(n)]
            assert (sp.shape, sp.dtype, sp.start, sp.numel) == (scale_shape(p.shape), "float32", 0,
                                                                math.prod(scale_shape(p.shape)))
            q, s = quantize_fp8_blocks(p.detach())
            assert np.array_equal(bits(src.flat(n)), bits(q).reshape(-1))
            assert torch.equal(src.flat(scale_name(n)), s.reshape(-1))
        else:
            assert pieces[n].dtype == "bfloat16" and torch.equal(src.flat(n), p.detach().reshape(-1))
    # The receiver side's translated expectations accept exactly this plan.
    plan = plan_buckets(list(pieces.values()), 1, 2 ** 16, {n: p.dtype for n, p in pieces.items()})
    expected = {n: (tuple(p.shape), "bfloat16") for n, p in params.items()}
    wire, dequant_to = fp8_wire_expected(expected)
    assert check_plan(plan, Expected(wire), "receiver 0") == []
    assert set(dequant_to) == eligible
    # and the plain expectations refuse it, naming the fp8 tensors
    errors = check_plan(plan, Expected(expected), "receiver 0")
    assert any("wrong dtype" in e and "q_proj.weight" in e for e in errors)
    assert any("unexpected" in e and "weight_scale_inv" in e for e in errors)


def test_tied_weights_keep_aliases_for_scales():
    model = TinyLM(tied=True)
    src = Fp8Source(ModuleSource(model), Fp8Rules(include_embeddings=True, include_lm_head=True))
    assert src.aliases["embed_tokens.weight"] == ("lm_head.weight",)
    assert src.aliases["embed_tokens.weight_scale_inv"] == ("lm_head.weight_scale_inv",)


def test_wire_bytes_at_most_055_of_bf16():
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o, bias=False) for i, o in
                                  [(384, 1024), (1024, 384), (384, 300), (300, 384)]]).bfloat16()
    plain = ModuleSource(model).pieces()
    fp8 = Fp8Source(ModuleSource(model)).pieces()
    b16 = plan_buckets(plain, 1, 2 ** 20, {p.name: p.dtype for p in plain}).total_bytes
    b8 = plan_buckets(fp8, 1, 2 ** 20, {p.name: p.dtype for p in fp8}).total_bytes
    assert b8 <= 0.55 * b16, (b8, b16)
    assert sum(fp8_wire_nbytes(p.shape) for p in plain) <= 0.51 * b16


# ---------------------------------------------------------------------------------------------- receiver side


def test_dequantizer_pairs_across_batches():
    ws = {f"l{i}.weight": wide((130, 260), torch.bfloat16, seed=i) for i in range(3)}
    qs = {n: quantize_fp8_blocks(w) for n, w in ws.items()}
    got = {}
    deq = Fp8Dequantizer(lambda b: got.update(b), list(ws), lambda n: torch.bfloat16)

    def view(t):  # batch tensors are views of receive buffers: overwritten after the call
        return t.clone()

    b1 = [("l0.weight", view(qs["l0.weight"][0])), ("l0.weight_scale_inv", view(qs["l0.weight"][1])),
          ("l1.weight_scale_inv", view(qs["l1.weight"][1])), ("l2.weight", view(qs["l2.weight"][0])),
          ("norm.weight", torch.ones(4))]
    deq(b1)
    for _, t in b1:
        t.zero_()  # the buffer is reused
    assert set(got) == {"l0.weight", "norm.weight"}
    with pytest.raises(RuntimeError, match="without their partner"):
        deq.finish()
    deq([("l1.weight", qs["l1.weight"][0]), ("l2.weight_scale_inv", qs["l2.weight"][1])])
    deq.finish()
    for n, (q, s) in qs.items():
        assert torch.equal(got[n], dequantize_fp8_blocks(q, s, torch.bfloat16)), n
        assert got[n].dtype == torch.bfloat16


def test_arrival_expectations_and_dtypes():
    exp = Expected({"a.weight": ((256, 128), "float32"), "a.bias": ((256,), "float32"),
                    "b.weight": ((64, 64), None)})
    arr = Fp8Arrival(exp, torch.bfloat16)
    assert arr.wire_expected.tensors == {"a.weight": ((256, 128), FP8_NAME), "a.weight_scale_inv": ((2, 1), "float32"),
                                         "a.bias": ((256,), "float32"), "b.weight": ((64, 64), FP8_NAME),
                                         "b.weight_scale_inv": ((1, 1), "float32")}
    assert arr._dtype("a.weight") == torch.float32 and arr._dtype("b.weight") == torch.bfloat16
    assert Fp8Arrival(None).wire_expected is None


def test_fp8_rules_come_from_the_config_through_the_join_info():
    """SyncConfig.fp8_rules reaches the receiver in its JoinInfo: both sides pick the same tensors for FP8."""
    from trainer_sync import Receiver, SyncConfig
    from trainer_sync.protocol.messages import JoinInfo

    rules = Fp8Rules(include_lm_head=True, exclude=(r"layers\.1\.",))
    assert Fp8Rules.from_dict(rules.to_dict()) == rules and Fp8Rules.from_dict(None) is None
    cfg = SyncConfig(wire_dtype="fp8", fp8_rules=rules)
    info = JoinInfo("127.0.0.1", 1, "t", 0, 1, 1, 0, "gloo", 5.0, wire_dtype="fp8",
                    fp8_rules=cfg.fp8_rules.to_dict())
    expected = {"lm_head.weight": ((256, 128), "bfloat16"), "layers.0.w.weight": ((256, 128), "bfloat16"),
                "layers.1.w.weight": ((256, 128), "bfloat16")}
    rx = Receiver(info.to_dict(), expected, device="cpu", dequantize_fp8=torch.bfloat16)
    wire = rx.expected.tensors
    assert wire["lm_head.weight"][1] == FP8_NAME and wire["layers.0.w.weight"][1] == FP8_NAME
    assert wire["layers.1.w.weight"][1] == "bfloat16" and "layers.1.w.weight_scale_inv" not in wire
    default = Receiver(dict(info.to_dict(), fp8_rules=None), expected, device="cpu", dequantize_fp8=torch.bfloat16)
    assert default.expected.tensors["lm_head.weight"][1] == "bfloat16"
    with pytest.raises(TypeError):
        SyncConfig(fp8_rules={"include_lm_head": True})
