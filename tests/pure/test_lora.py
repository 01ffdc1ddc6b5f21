"""LoRA pushes without processes (issue 27): PEFT detection and names (sources/peft.py), the merged tensors against
PEFT's own merge (sources/lora.py), and rank 0's choices (plan/lora.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from tests.helpers.lora import TARGETS, merged_copy, peft_model
from tests.helpers.models import build_model

from trainer_sync.plan import lora as plan
from trainer_sync.protocol import wire
from trainer_sync.protocol.lora import LoraOffer, LoraSupport
from trainer_sync.protocol.messages import PlanOffer
from trainer_sync.sources import LoraSource, ModuleSource, make_source
from trainer_sync.sources.peft import engine_name, find_adapter


def test_a_peft_lora_model_is_recognised_also_wrapped_and_a_dense_one_is_not():
    model = peft_model()
    adapter = find_adapter(model)
    assert adapter.name == "default" and adapter.rank == 4 and len(adapter.modules) == 2 * len(TARGETS)
    assert adapter.config["r"] == 4 and adapter.config["lora_alpha"] == 8
    assert sorted(adapter.config["target_modules"]) == sorted(TARGETS)
    q = adapter.modules[0]
    assert q.module == "model.layers.0.self_attn.q_proj" and q.scaling == 2.0
    assert q.a == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"

    class Wrapper(torch.nn.Module):  # DDP / a DeepSpeed engine: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert find_adapter(Wrapper(model)) == adapter
    assert isinstance(make_source(Wrapper(model), rank=0, world=1), LoraSource)
    assert find_adapter(build_model()) is None
    assert isinstance(make_source(build_model(), rank=0, world=1), ModuleSource)


def test_names_engine_and_saved_forms():
    assert engine_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight", "default") == \
        "model.layers.0.mlp.up_proj.weight"
    assert engine_name("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight", "default") is None
    assert engine_name("base_model.model.lm_head.modules_to_save.default.weight", "default") == "lm_head.weight"
    assert engine_name("base_model.model.lm_head.original_module.weight", "default") is None
    src = make_source(peft_model(), rank=0, world=1)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in src.names(plan.ADAPTER)
    assert "model.layers.1.mlp.down_proj.weight" in src.names(plan.MERGED)
    assert "model.norm.weight" in src.names(plan.DENSE)
    assert src.aliases == {"model.embed_tokens.weight": ("lm_head.weight",)}  # tied, as the engine names it


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_tensors_are_exactly_peft_merge_and_unload(dtype):
    model = peft_model(dtype=dtype)
    src = make_source(model, rank=0, world=1)
    pieces = {p.name: p for p in src.pieces()}
    ref = merged_copy(model).state_dict()
    for name in src.names(plan.MERGED) + src.names(plan.DENSE):
        got = src.flat(name).view(pieces[name].shape)
        assert got.dtype == ref[name].dtype and torch.equal(got, ref[name]), name
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(src.flat(a), model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
                       .weight.reshape(-1))


def support(**kw) -> LoraSupport:
    base = dict(enabled=True, max_lora_rank=8, max_loras=1,
                modules=[f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")],
                packing={"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]})
    return LoraSupport(**{**base, **kw})


def test_auto_takes_adapter_mode_only_when_every_engine_has_lora():
    assert plan.choose_mode("auto", [support(), support()]) == ("adapter", "every engine has LoRA enabled")
    assert plan.choose_mode("auto", [support(), support(enabled=False)]) == \
        ("merged", "receiver 1 has no LoRA enabled (vLLM enable_lora=False)")
    assert plan.choose_mode("auto", [None])[0] == "merged"  # a plain receiver says nothing of LoRA
    assert plan.choose_mode("merged", [support()]) == ("merged", "SyncConfig(lora='merged')")
    with pytest.raises(ValueError, match="SyncConfig.lora"):
        plan.choose_mode("both", [support()])


def test_adapter_refusals_name_the_module_and_the_setting():
    q = "model.layers.0.self_attn.q_proj"
    expected = {q + ".weight": ((64, 64), "float32")}
    assert plan.adapter_refusals({q: (4, 64, 64)}, support(), expected, "receiver 0") == []
    assert plan.adapter_refusals({q: (16, 64, 64)}, support(), expected, "receiver 0") == [
        "receiver 0: module model.layers.0.self_attn.q_proj: adapter rank 16 is above the engine's max_lora_rank 8 "
        "(start it with max_lora_rank >= 16)"]
    lines = plan.adapter_refusals({"model.layers.0.mlp.up_proj": (4, 64, 128)}, support(), expected, "receiver 1")
    assert lines and lines[0].startswith("receiver 1: target module model.layers.0.mlp.up_proj is not one the "
                                         "engine's model can adapt")
    off = plan.adapter_refusals({q: (4, 64, 64)}, support(enabled=False), expected, "receiver 0")
    assert "started without LoRA" in off[0] and "enable_lora=True" in off[0] and "max_lora_rank >= 4" in off[0]
    assert "does not" not in plan.adapter_refusals({q: (4, 64, 32)}, support(), expected, "r")[0] and \
        "maps 64 -> 32 features, the engine's weight is [64, 64]" in plan.adapter_refusals(
            {q: (4, 64, 32)}, support(), expected, "r")[0]


def test_select_adapter_merged_with_base_and_partial_with_whole_fused_layers():
    kinds = {"a.lora_A.weight": plan.ADAPTER, "m.layers.0.self_attn.q_proj.weight": plan.MERGED,
             "m.layers.0.self_attn.k_proj.weight": plan.DENSE, "m.layers.0.self_attn.o_proj.weight": plan.DENSE,
             "m.layers.0.mlp.up_proj.weight": plan.MERGED, "m.layers.0.mlp.gate_proj.weight": plan.DENSE,
             "m.norm.weight": plan.DENSE, "lm_head.weight": plan.DENSE}
    packing = support().packing
    assert plan.select("adapter", kinds) == ["a.lora_A.weight"]
    assert plan.select("adapter", kinds, ("lm_head",)) == ["a.lora_A.weight", "lm_head.weight"]
    assert plan.select("merged", kinds, packing=packing) == [n for n in kinds if n != "a.lora_A.weight"]
    assert plan.select("merged", kinds, packing=packing, with_base=False) == [
        "m.layers.0.self_attn.q_proj.weight", "m.layers.0.self_attn.k_proj.weight",
        "m.layers.0.mlp.up_proj.weight", "m.layers.0.mlp.gate_proj.weight"]
    assert plan.select("merged", kinds, with_base=False) == ["m.layers.0.self_attn.q_proj.weight",
                                                             "m.layers.0.mlp.up_proj.weight"]


def test_lora_messages_round_trip():
    offer = LoraOffer("adapter", "trainer_sync", 5, {"r": 4, "lora_alpha": 8}, why="every engine has LoRA enabled")
    msg = wire.decode(wire.encode(PlanOffer("{}", 2, 3, lora=offer)), PlanOffer)
    assert msg.lora == offer
    assert wire.decode(wire.encode(PlanOffer("{}", 2, 3)), PlanOffer).lora is None
    assert wire.from_wire(wire.to_wire(support()), LoraSupport) == support()


def test_merged_weights_are_never_offered_as_live_parameters():
    """CUDA IPC's direct path exports ``source.params[name]`` and lets the engine read it in place: for a merged
    weight that would be the unmerged base. Only adapter and dense tensors are live."""
    src = make_source(peft_model(), rank=0, world=1)
    assert not set(src.names(plan.MERGED)) & set(src.params)
    assert set(src.params) == set(src.names(plan.ADAPTER)) | set(src.names(plan.DENSE))
    assert src.device == torch.device("cpu")
