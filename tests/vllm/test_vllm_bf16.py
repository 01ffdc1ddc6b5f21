"""An fp32 trainer into a bf16 engine: with the default wire_dtype="auto" the engine's handshake asks for bf16, so
the trainer casts while packing and half the bytes travel. In-process engine only: bf16 in a separate worker
process can hit an AMX "Illegal instruction" on this CPU (shared/DESIGN.md)."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from tests.helpers.models import build_model, perturb, prompts
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, llm_worker, served_version

from trainer_sync import WeightSync

pytestmark = pytest.mark.vllm


def test_fp32_trainer_to_bf16_engine_sends_bf16(model_dir):  # an fp32 checkpoint, served in bf16
    model = build_model(seed=0)
    perturb(model, seed=41)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    ps = list(prompts().values())
    with in_process_llm(model_dir, dtype="bfloat16") as llm:
        served = llm_worker(llm).model_runner.model
        old = llm_greedy(llm, ps, 8)
        with WeightSync(model, [llm]) as sync:
            report = sync.push()
        assert report.wire_dtype == "bfloat16"
        assert fp32_bytes / 2 <= report.bytes < fp32_bytes * 0.6  # half the bytes (plus bucket alignment)
        params = dict(model.named_parameters())
        for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.k_norm.weight"]:
            got = dict(served.named_parameters())[name]
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, params[name].detach().to(torch.bfloat16)), name
        # Linear weights are repacked for oneDNN (no readable parameter): check them through the layer itself.
        x = torch.randn(4, 128, dtype=torch.bfloat16)
        out = served.model.layers[0].mlp.down_proj(x)[0].float()
        ref = x.float() @ params["model.layers.0.mlp.down_proj.weight"].detach().to(torch.bfloat16).float().T
        assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2), (out - ref).abs().max()
        assert served_version(llm) == "1"
        assert llm_greedy(llm, ps, 8) != old
