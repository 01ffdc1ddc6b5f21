"""Fused experts presented under the checkpoint's per-expert names (sources/experts.py) and the MoE routing facts
the handshake compares (plan/handshake.py model_facts / check_model): pure, no processes."""
from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.models import build_model, tiny_config
from trainer_sync.plan.buckets import LocalPiece
from trainer_sync.plan.handshake import check_model, model_facts
from trainer_sync.protocol.messages import Expected
from trainer_sync.sources import ExpertSplitSource, make_source
from trainer_sync.sources.experts import expert_views, view_pieces


def test_split_names_and_bytes_equal_what_transformers_saves(tmp_path):
    model = build_model(seed=3, kind="qwen3_moe")
    fused = [n for n, _ in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused, "this transformers keeps experts fused; the test needs that layout"
    model.save_pretrained(tmp_path, safe_serialization=True)
    saved = {}
    for f in glob.glob(str(tmp_path / "*.safetensors")):
        saved.update(load_file(f))
    source = make_source(model)
    assert isinstance(source, ExpertSplitSource)
    pieces = {p.name: p for p in source.pieces()}
    assert set(pieces) == set(saved)  # lm_head is tied: it travels as the embedding's alias
    for name, tensor in saved.items():
        got = source.flat(name).view(pieces[name].shape)
        assert torch.equal(got, tensor), name
        # a view of the live parameter, not a copy: the packer reads the trainer's memory
        assert source.live(name).untyped_storage().data_ptr() in {
            p.untyped_storage().data_ptr() for p in model.parameters()}
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in pieces and "model.layers.0.mlp.gate.weight" in pieces


def test_a_partition_that_cuts_experts_yields_the_overlaps():
    views = expert_views({"m.experts.gate_up_proj": (2, 4, 3)}, hidden_size=3)["m.experts.gate_up_proj"]
    assert [(v.name, v.offset, v.shape) for v in views] == [
        ("m.experts.0.gate_proj.weight", 0, (2, 3)), ("m.experts.0.up_proj.weight", 6, (2, 3)),
        ("m.experts.1.gate_proj.weight", 12, (2, 3)), ("m.experts.1.up_proj.weight", 18, (2, 3))]
    # a ZeRO-3-like range [4, 14) of the 24 elements: the end of gate 0, all of up 0, the start of gate 1
    got = view_pieces(LocalPiece("m.experts.gate_up_proj", (2, 4, 3), "float32", 4, 10, 1), views)
    assert [(p.name, p.start, p.numel, p.rank) for p in got] == [
        ("m.experts.0.gate_proj.weight", 4, 2, 1), ("m.experts.0.up_proj.weight", 0, 6, 1),
        ("m.experts.1.gate_proj.weight", 0, 2, 1)]


def test_a_transposed_fused_layout_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"m\.experts\.gate_up_proj has shape \[4, 64, 64\]"):
        expert_views({"m.experts.gate_up_proj": (4, 64, 64)}, hidden_size=32)
    assert expert_views({"m.mlp.down_proj.weight": (64, 32)}, hidden_size=64) == {}  # a dense MLP: untouched


def test_routing_facts_that_differ_are_named_with_both_values():
    trainer = model_facts(tiny_config("qwen3_moe", top_k=4))
    assert trainer["num_experts_per_tok"] == 4 and trainer["num_experts"] == 8
    engine = Expected({}, model=model_facts(tiny_config("qwen3_moe", top_k=2)))
    assert check_model(trainer, engine, "receiver 0") == [
        "receiver 0: model config num_experts_per_tok (experts routed per token (top-k)): trainer 4, engine 2"]
    assert check_model(trainer, Expected({}, model=dict(trainer)), "receiver 0") == []
    assert model_facts(tiny_config("qwen3")) == {}  # a dense model states none: nothing to compare
    assert Expected.from_json(engine.to_json()) == engine


def test_recipe_changed_by_kind_counts_each_expert_apart():
    """recipes/grpo_tiny.py --changed-per-tensor: the changed fraction per kind, each fused expert on its own."""
    from recipes.grpo_tiny import changed_by_kind

    before = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 6, 8), "model.norm.weight": torch.ones(8),
              "model.layers.0.mlp.gate.weight": torch.zeros(4, 8)}
    after = {k: v.clone() for k, v in before.items()}
    after["model.layers.0.mlp.experts.gate_up_proj"][1, 0, :4] = 1.0  # expert 1: 4 of its 48 elements
    after["model.layers.0.mlp.gate.weight"][0, 0] = -0.0  # another bit pattern for the same value: changed
    got = changed_by_kind(before, after)
    assert got["experts"] == {"min": 0.0, "median": 0.0, "max": round(4 / 48, 6), "unchanged": 3, "count": 4}
    assert got["router"] == round(1 / 32, 6) and got["norms"] == 0.0
