"""FP8 on the wire with real processes on gloo: what arrives is exactly the codec's output, bytes halve."""
import numpy as np
import torch

from tests.helpers import fp8_roles
from tests.helpers.cluster import free_port, run_roles
from tests.helpers.tensors import bits
from trainer_sync.codec import dequantize_fp8_blocks, fp8_eligible, quantize_fp8_blocks, scale_name


def check_delivery(want: dict, got: dict, mode: str, dtype):
    eligible = {n for n, t in want.items() if fp8_eligible(n, t.shape, t.dtype)}
    assert eligible
    if mode == "passthrough":
        assert set(got) == set(want) | {scale_name(n) for n in eligible}
    else:
        assert set(got) == set(want)
    for name, w in want.items():
        if name not in eligible:
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), name  # exact bytes
            continue
        q, s = quantize_fp8_blocks(w)
        if mode == "passthrough":  # checkpoint format, bit for bit
            assert got[name].dtype == torch.float8_e4m3fn and np.array_equal(bits(got[name]), bits(q)), name
            assert torch.equal(got[scale_name(name)], s), name
        else:
            deq = dequantize_fp8_blocks(q, s, dtype)
            assert got[name].dtype == dtype and torch.equal(got[name], deq), name
            assert not torch.equal(got[name], w.to(dtype))  # it really went through fp8


def test_plain_fp8_push_dequantized_and_passthrough_and_bytes():
    ports = (free_port(), free_port())
    res = run_roles([("trainer", 0, 1, fp8_roles.plain_trainer, (2, ports)),
                     ("receiver", 0, 2, fp8_roles.plain_receiver, (1, ports, "dequantize")),
                     ("receiver", 1, 2, fp8_roles.plain_receiver, (1, ports, "passthrough"))], timeout=180)
    want, reports = res[("trainer", 0)]
    for j, mode in enumerate(("dequantize", "passthrough")):
        (fp8_bytes, got), (b16_bytes, plain) = res[("receiver", j)]
        check_delivery(want, got, mode, torch.bfloat16)
        for n, w in want.items():
            assert torch.equal(plain[n], w)
        assert fp8_bytes == reports["fp8"]["bytes"] and b16_bytes == reports["model"]["bytes"]
    # embeddings, lm_head, norms and biases stay bf16 and still the whole push is about half
    assert reports["fp8"]["bytes"] <= 0.55 * reports["model"]["bytes"], reports
    assert reports["fp8"]["wire_dtype"] == "bfloat16,float32,float8_e4m3fn"


def test_fsdp2_shards_straddling_blocks_quantize_like_the_full_tensor():
    port = free_port()
    res = run_roles([("trainer", r, 2, fp8_roles.fsdp_trainer, (2, port)) for r in range(2)]
                    + [("receiver", 0, 2, fp8_roles.fsdp_receiver, (2, port, "dequantize")),
                       ("receiver", 1, 2, fp8_roles.fsdp_receiver, (2, port, "passthrough"))], timeout=180)
    states, reports = res[("trainer", 0)]
    assert not torch.equal(states[0]["up.weight"], states[1]["up.weight"])
    for j, mode in enumerate(("dequantize", "passthrough")):
        for push, (nbytes, got) in enumerate(res[("receiver", j)]):
            check_delivery(states[push], got, mode, torch.float32)
            assert nbytes == reports[push]["bytes"]
    # the agreed scale differs from what rank 1 alone would have computed for the block row it shares
    w = states[0]["up.weight"]
    _, s_full = quantize_fp8_blocks(w)
    _, s_rank1 = quantize_fp8_blocks(w[150:256])
    assert not torch.equal(s_full[1], s_rank1[0])


def test_zero3_fp8_push_passthrough_is_the_codec_output():
    port = free_port()
    res = run_roles([("trainer", r, 2, fp8_roles.zero3_trainer, (1, port)) for r in range(2)]
                    + [("receiver", 0, 1, fp8_roles.zero3_receiver, (2, port))], timeout=240)
    want, report = res[("trainer", 0)]
    nbytes, got = res[("receiver", 0)]
    check_delivery(want, got, "passthrough", None)
    assert nbytes == report["bytes"] and report["num_buckets"] > 2
