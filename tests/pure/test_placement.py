"""engines/placement.py: learning where each checkpoint tensor lands, on modules whose ``load_weights`` works the way
vLLM's loaders do (narrow a fused parameter, copy a checkpoint tensor or a TP shard of it into it), and refusing
whatever the fast path could not repeat (a loader that transforms, overlapping places, writes it does not know).

On CPU the model itself is never eligible (vLLM repacks weights there): these tests call ``learn`` directly and arm
the fast path by hand; tests/test_vllm_gpu.py proves it against a real engine on a GPU.
"""
from __future__ import annotations

import torch

from trainer_sync.codec import delta as D
from trainer_sync.engines.vllm.placement import DirectApply, checksum, ineligible_reason, learn, whole_targets


class FusedQKV(torch.nn.Module):
    """q, k, v checkpoint tensors -> one fused parameter, like vLLM's QKVParallelLinear (optionally one TP shard)."""

    def __init__(self, q=8, kv=4, cols=6, tp_rank=None, transform=None):
        super().__init__()
        self.q, self.kv, self.cols, self.tp_rank, self.transform = q, kv, cols, tp_rank, transform
        width = cols // 2 if tp_rank is not None else cols
        self.qkv = torch.nn.Parameter(torch.zeros(q + 2 * kv, width, dtype=torch.bfloat16), requires_grad=False)
        self.norm = torch.nn.Parameter(torch.ones(cols, dtype=torch.bfloat16), requires_grad=False)

    def shapes(self):
        bf = torch.bfloat16
        return {"q.weight": ((self.q, self.cols), bf), "k.weight": ((self.kv, self.cols), bf),
                "v.weight": ((self.kv, self.cols), bf), "norm.weight": ((self.cols,), bf),
                "rotary.inv_freq": ((3,), torch.float32)}

    def load_weights(self, weights):
        offsets = {"q.weight": 0, "k.weight": self.q, "v.weight": self.q + self.kv}
        for name, w in weights:
            if name == "norm.weight":
                self.norm.data.copy_(w)
            elif name in offsets:
                if self.tp_rank is not None:  # a row-parallel shard: half the columns (a strided view)
                    half = self.cols // 2
                    w = w.narrow(1, self.tp_rank * half, half)
                if self.transform == "scale":
                    w = w * 2  # a loader that computes: its result is no view of the checkpoint tensor
                dst = self.qkv.data.narrow(0, offsets[name], w.shape[0])
                dst.copy_(w)
                if self.transform == "overlap" and name == "k.weight":
                    self.qkv.data.narrow(0, 0, w.shape[0]).copy_(w)
                if self.transform == "inplace":
                    self.qkv.data.mul_(1)
            # rotary.inv_freq: ignored, as vLLM's loaders skip it


def random_weights(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(d) for n, (s, d) in shapes.items()}


def test_slots_reproduce_load_weights_exactly():
    for tp_rank in (None, 1):
        model, ref = FusedQKV(tp_rank=tp_rank), FusedQKV(tp_rank=tp_rank)
        slots, why = learn(model, model.shapes())
        assert why == "" and set(slots) == {"q.weight", "k.weight", "v.weight", "norm.weight"}
        assert torch.count_nonzero(model.qkv) == 0  # learning wrote nothing
        w = random_weights(model.shapes())
        ref.load_weights(list(w.items()))
        direct = DirectApply(model, torch.device("cpu"))
        direct.slots, direct.armed = slots, True
        direct.apply(list(w.items()))
        assert torch.equal(model.qkv.view(torch.int16), ref.qkv.view(torch.int16))
        assert torch.equal(model.norm, ref.norm)


def test_loaders_the_fast_path_cannot_repeat_are_refused():
    for transform, why in (("scale", "written by copy_"), ("overlap", "overlap"), ("inplace", "written by mul_")):
        model = FusedQKV(transform=transform)
        slots, reason = learn(model, model.shapes())
        assert slots is None and why in reason, (transform, reason)


def test_the_proof_arms_only_when_every_place_holds_what_was_received():
    model = FusedQKV()
    direct = DirectApply(model, torch.device("cpu"))
    direct.slots, _ = learn(model, model.shapes())
    w = random_weights(model.shapes(), seed=1)
    direct.observe(list(w.items()))
    model.load_weights(list(w.items()))  # what vLLM's reload did with them
    direct.verify()
    assert direct.armed
    # A loader whose result differs from what arrived (processing after loading) never arms.
    model2 = FusedQKV()
    direct2 = DirectApply(model2, torch.device("cpu"))
    direct2.slots, _ = learn(model2, model2.shapes())
    direct2.observe(list(w.items()))
    model2.load_weights(list(w.items()))
    model2.qkv.data[0, 0] += 1  # e.g. a repack or quantization step
    direct2.verify()
    assert not direct2.armed and direct2.slots is None and "differ" in direct2.why_not


def test_disabled_by_the_trainer_never_arms_and_keeps_what_it_learned():
    model = FusedQKV()
    direct = DirectApply(model, torch.device("cpu"))
    direct.slots, _ = learn(model, model.shapes())
    direct.enable(False)
    w = random_weights(model.shapes())
    direct.observe(list(w.items()))
    model.load_weights(list(w.items()))
    direct.verify()
    assert not direct.armed
    direct.enable(True)
    assert direct.why_not is None and direct.slots is not None


def test_cpu_models_and_processing_layers_keep_the_layerwise_path():
    assert "cpu" in ineligible_reason(FusedQKV(), torch.device("cpu"))

    class Fp8LinearMethod:
        pass

    model = FusedQKV()
    model.quant_method = Fp8LinearMethod()
    assert "Fp8LinearMethod" in ineligible_reason(model, torch.device("cuda"))


def test_checksum_sees_every_bit():
    a = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)
    assert not torch.equal(checksum(a), checksum(b))


def test_whole_targets_are_the_slices_that_hold_a_checkpoint_tensor_one_to_one():
    """Delta destinations: q/k/v rows of the fused parameter and the norm are whole tensors, written in place by a
    delta; a TP shard (half the columns: a strided view) is not, and says why."""
    model = FusedQKV()
    slots, _ = learn(model, model.shapes())
    targets, why_not = whole_targets(slots, model.shapes())
    assert set(targets) == {"q.weight", "k.weight", "v.weight", "norm.weight"} and not why_not
    assert targets["k.weight"].shape == (4, 6) and targets["k.weight"].is_contiguous()
    # the targets ARE the parameter: a delta decoded into one changes exactly its rows of qkv
    old = targets["k.weight"].clone()
    new = old.clone()
    new.view(-1)[[3, 17]] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    D.decode_into(targets["k.weight"], D.encode(old, new)[0])
    assert torch.equal(model.qkv[8:12].view(torch.int16), new.view(torch.int16))
    assert torch.count_nonzero(model.qkv[:8]) == 0 and torch.count_nonzero(model.qkv[12:]) == 0

    shard = FusedQKV(tp_rank=1)
    slots, _ = learn(shard, shard.shapes())
    targets, why_not = whole_targets(slots, shard.shapes())
    assert set(targets) == {"norm.weight"} and set(why_not) == {"q.weight", "k.weight", "v.weight"}
    assert "only part of it" in why_not["q.weight"]


def test_whole_targets_refuses_a_tensor_loaded_into_two_places():
    class Twice(FusedQKV):
        def load_weights(self, weights):
            for name, w in weights:
                if name == "norm.weight":
                    self.norm.data.copy_(w)
                    self.qkv.data[0].copy_(w)  # the same tensor in a second place

    model = Twice()
    slots, _ = learn(model, model.shapes())
    targets, why_not = whole_targets(slots, model.shapes())
    assert not targets and "2 places" in why_not["norm.weight"]


def test_armed_fast_path_offers_its_slices_and_skips_copying_them_onto_themselves():
    model, ref = FusedQKV(), FusedQKV()
    direct = DirectApply(model, torch.device("cpu"))
    assert direct.delta_targets() == (None, "its fast apply path is not armed (not proven yet)")
    direct.slots, _ = learn(model, model.shapes())
    direct.shapes = model.shapes()
    direct.armed = True
    targets, why = direct.delta_targets()
    assert why == "" and direct.delta_targets()[0] is targets  # the same dict while the placement stands
    w = random_weights(model.shapes(), seed=2)
    ref.load_weights(list(w.items()))
    for name, t in targets.items():  # what a receiver writing into its targets does
        t.copy_(w[name])
    writes = {n: t._version for n, t in targets.items()}  # torch counts in-place writes (views share the count)
    direct.apply([(n, targets[n]) for n in targets])  # the receiver hands out the targets themselves: no copy
    assert {n: t._version for n, t in targets.items()} == writes
    direct.apply([("norm.weight", w["norm.weight"].clone())])  # a received buffer is still copied
    assert targets["norm.weight"]._version > writes["norm.weight"]
    assert targets["q.weight"]._version == writes["q.weight"]
    assert torch.equal(model.qkv.view(torch.int16), ref.qkv.view(torch.int16)) and torch.equal(model.norm, ref.norm)
