"""TP-aware bytes planning (trainer_sync/experimental/tp.py): pure functions, no processes.

A small Llama/Qwen3-shaped model (GQA with 2 kv heads, a vocab that needs padding) on trainer ranks that hold whole
tensors or FSDP2-like dim-0 shards; receivers grouped by tp rank for tp 1..8. Checked: each group's plan carries
every element its tp rank needs exactly once and nothing else; bytes per receiver; GQA replication; vocab padding;
shards rebuilt from the packed buckets equal torch.chunk / vLLM's own shard rules (and, where vLLM imports, what
vLLM's own weight loaders keep).
"""
import math

import pytest
import torch

from trainer_sync.pipeline.loops import Assembler, pack_bucket
from trainer_sync.plan.buckets import Expected, LocalPiece, PlanError, check_plan, dtype_name
from trainer_sync.experimental.tp import (REPLICATED, ShardSource, Split, Strided, TpLayout, gather_strided, llama_layout,
                             loader_tensor, plan_tp, shard_bounds, shard_expected, tp_ranges)

H, HEADS, KV, HD, INTER, VOCAB, LAYERS = 64, 8, 2, 8, 96, 1000, 2


def model_tensors(seed=0, dtype=torch.float32, tied=False, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (HEADS * HD, H),
                  p + "self_attn.k_proj.weight": (KV * HD, H), p + "self_attn.v_proj.weight": (KV * HD, H),
                  p + "self_attn.q_norm.weight": (HD,), p + "self_attn.k_norm.weight": (HD,),
                  p + "self_attn.o_proj.weight": (H, HEADS * HD), p + "post_attention_layernorm.weight": (H,),
                  p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
                  p + "mlp.down_proj.weight": (H, INTER)})
    t["model.norm.weight"] = (H,)
    if not tied:
        t["lm_head.weight"] = (vocab, H)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in t.items()}


class FakeSource:
    """What sources.* give the packer: whole tensors (plain/DDP) or torch.chunk dim-0 shards (FSDP2)."""

    def __init__(self, tensors, rank, world, fsdp):
        self.rank, self.world, self.aliases = rank, world, {}
        self.local = {}
        for n, t in tensors.items():
            if fsdp:
                rows, per = t.shape[0], math.prod(t.shape[1:])
                chunk = -(-rows // world)
                lo, hi = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
                self.local[n] = (t.reshape(-1)[lo * per:hi * per], lo * per, tuple(t.shape), t.dtype)
            else:
                self.local[n] = (t.reshape(-1), 0, tuple(t.shape), t.dtype)

    device = torch.device("cpu")

    def pieces(self):
        return [LocalPiece(n, s, dtype_name(d), start, f.numel(), self.rank) for n, (f, start, s, d) in self.local.items()]

    def flat(self, name):
        return self.local[name][0]

    def gathering(self, names):
        import contextlib
        return contextlib.nullcontext()


def sources_for(tensors, world, fsdp):
    return [FakeSource(tensors, r, world, fsdp) for r in range(world)]


def all_pieces(sources):
    return [p for s in sources for p in s.pieces()]


def move(tp_plan, sources, t):
    """Pack every bucket of group t on its sender and assemble on a receiver: name -> shard tensor."""
    g = tp_plan.groups[t]
    shard_srcs = {s.rank: ShardSource(s, tp_plan, t) for s in sources}
    starts = {r: {p.name: p.start for p in ss.pieces()} for r, ss in shard_srcs.items()}
    asm, got = Assembler(g.plan, torch.device("cpu"), None), {}
    for b in g.plan.buckets:
        buf = torch.full((b.nbytes,), 0xAB, dtype=torch.uint8)
        pack_bucket(b, g.plan, shard_srcs[b.src], starts[b.src], buf)
        for name, tensor in asm.add(b, buf):
            assert name not in got, f"{name} handed out twice"
            got[name] = tensor.clone()
    assert not asm.partial
    return got


def vllm_shard(name, full, tp, t):
    """The checkpoint slab vLLM's loaders keep on tp rank t (written from vLLM 0.32's linear.py / vocab_parallel_
    embedding.py, independently of tp.py): torch.chunk for even splits, kv head t // replicas, padded vocab rows."""
    if "norm" in name:
        return full
    if "k_proj" in name or "v_proj" in name:
        if tp <= KV:
            return torch.chunk(full, tp, 0)[t]
        head = t // (tp // KV)
        return full[head * HD:(head + 1) * HD]
    if "embed_tokens" in name or "lm_head" in name:
        per = (-(-full.shape[0] // 64) * 64) // tp
        return full[min(t * per, full.shape[0]):min((t + 1) * per, full.shape[0])]
    if "o_proj" in name or "down_proj" in name:
        return torch.chunk(full, tp, 1)[t]
    return torch.chunk(full, tp, 0)[t]


LAYOUT = llama_layout(HEADS, KV)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("fsdp,world", [(False, 1), (False, 2), (True, 3)])
def test_each_group_gets_exactly_its_shard(tp, fsdp, world):
    tensors = model_tensors()
    sources = sources_for(tensors, world, fsdp)
    receiver_tp = [j % tp for j in range(2 * tp)]  # two engine replicas
    plan = plan_tp(all_pieces(sources), world, 8192, LAYOUT, tp, receiver_tp)
    assert sorted(plan.groups) == list(range(tp))
    for t, g in plan.groups.items():
        assert g.receivers == (t, t + tp)
        # every needed element exactly once per group, nothing else
        for name, full in tensors.items():
            slots = sorted((s.start, s.numel) for b in g.plan.buckets for s in b.slots if s.name == name)
            cursor = 0
            for start, numel in slots:
                assert start == cursor, (name, slots)
                cursor += numel
            assert cursor == g.ranges[name].numel == g.plan.tensors[name].numel
            sent = torch.cat([torch.cat([x.indices() for x in g.ranges[name].to_global(a, a + n)] or
                                        [torch.empty(0, dtype=torch.long)]) for a, n in slots] or
                             [torch.empty(0, dtype=torch.long)])
            want = vllm_shard(name, torch.arange(full.numel()).view(full.shape), tp, t).reshape(-1)
            assert torch.equal(sent, want), name
        # bytes through the real packer and assembler: the shard vLLM would keep, bit for bit
        got = move(plan, sources, t)
        assert set(got) == set(tensors)
        for name, full in tensors.items():
            want = vllm_shard(name, full, tp, t)
            assert got[name].shape == want.shape and torch.equal(got[name], want), (name, t)


def test_bytes_per_receiver_about_one_over_tp():
    tensors = model_tensors()
    nbytes = {n: t.numel() * 4 for n, t in tensors.items()}
    full = sum(nbytes.values())
    repl = sum(b for n, b in nbytes.items() if "norm" in n)
    kv = sum(b for n, b in nbytes.items() if "k_proj" in n or "v_proj" in n)
    sources = sources_for(tensors, 2, True)
    for tp in (1, 2, 4, 8):
        plan = plan_tp(all_pieces(sources), 2, 1 << 20, LAYOUT, tp, list(range(tp)))
        assert plan.full_bytes == full and plan.replicated_bytes() == repl
        # sum over groups: the model once, plus replicated tensors once more per extra group, plus GQA copies
        kv_copies = max(1, tp // KV)
        assert plan.total_bytes == full + (tp - 1) * repl + (kv_copies - 1) * kv
        for t, b in plan.bytes_per_tp_rank().items():
            ideal = (full - repl) / tp + repl
            assert b <= full
            assert abs(b - ideal) <= 0.1 * full, (tp, t, b, ideal)  # vocab rows and kv heads are not exactly 1/tp
        assert plan.bytes_per_receiver() == [plan.bytes_per_tp_rank()[t] for t in range(tp)]
    # tp 1 is a plain push
    assert plan_tp(all_pieces(sources), 2, 1 << 20, LAYOUT, 1, [0, 0]).total_bytes == full


def test_gqa_replication():
    shape = (KV * HD, H)
    split = LAYOUT.split_of("model.layers.0.self_attn.k_proj.weight")
    # tp 8 over 2 kv heads: ranks 0-3 hold head 0, ranks 4-7 head 1 (vLLM: tp_rank // num_kv_head_replicas)
    got = [shard_bounds(split, shape[0], 8, t) for t in range(8)]
    assert got == [(0, HD)] * 4 + [(HD, 2 * HD)] * 4
    assert all(tp_ranges(shape, split, 8, t).numel == HD * H for t in range(8))
    # q heads are never replicated: vLLM refuses tp > num_attention_heads, so do we
    with pytest.raises(PlanError, match="cannot be split"):
        shard_bounds(LAYOUT.split_of("x.q_proj.weight"), HEADS * HD, 16, 0, "q")
    with pytest.raises(PlanError, match="cannot be split"):
        shard_bounds(Split("heads", 0, 3, replicate=True), 3 * HD, 4, 0, "k")  # 4 % 3 != 0


def test_vocab_padding():
    split = Split("vocab")
    # 1000 -> padded 1024; tp 8 -> 128 rows each; the last rank holds rows 896..999 (24 padding rows not sent)
    assert [shard_bounds(split, 1000, 8, t) for t in (0, 6, 7)] == [(0, 128), (768, 896), (896, 1000)]
    # Qwen3's 151936 is already a multiple of 64: even split
    assert shard_bounds(split, 151936, 8, 7) == (7 * 18992, 151936)
    # a tiny vocab: rank 3 holds only padding -> an empty shard, which still travels (as an empty tensor)
    assert shard_bounds(split, 65, 4, 3) == (65, 65)
    tensors = {"model.embed_tokens.weight": torch.randn(65, 8), "model.norm.weight": torch.randn(8)}
    sources = sources_for(tensors, 2, True)
    plan = plan_tp(all_pieces(sources), 2, 4096, LAYOUT, 4, [0, 1, 2, 3])
    got = move(plan, sources, 3)
    assert got["model.embed_tokens.weight"].shape == (0, 8)
    assert torch.equal(move(plan, sources, 2)["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"][64:])
    # tp that does not divide the padded vocab: vLLM's divide() asserts; we say why before any byte moves
    with pytest.raises(PlanError, match="padded vocab"):
        shard_bounds(split, 1000, 3, 0, "embed")


def test_strided_ranges_and_local_mapping():
    # dim-1 split of a [6, 8] matrix over tp 4: 6 runs of 2 elements, 8 apart
    s = tp_ranges((6, 8), Split("even", 1), 4, 1)
    assert s == Strided(2, 2, 8, 6)
    x = torch.arange(48)
    assert torch.equal(gather_strided(x, [s]), torch.chunk(x.view(6, 8), 4, 1)[1].reshape(-1))
    # any contiguous global range maps to one contiguous local range, and back
    for a in range(49):
        for b in range(a, 49):
            la, lb = s.to_local(a, b)
            want = [i for i in s.indices().tolist() if a <= i < b]
            assert list(range(la, lb)) == [s.indices().tolist().index(i) for i in want]
            back = [i for part in s.to_global(la, lb) for i in part.indices().tolist()]
            assert back == want
            assert len(s.to_global(la, lb)) <= 3
    # dim-1 split of a 3-D tensor and a dim-0 split are single Strided as well
    assert tp_ranges((2, 4, 3), Split("even", 1), 2, 1) == Strided(6, 6, 12, 2)
    assert tp_ranges((8, 3), Split("even", 0), 4, 2) == Strided(12, 6, 24, 1)
    assert tp_ranges((8, 3), REPLICATED, 4, 2).numel == 24


def test_shard_expected_and_check_plan():
    tensors = model_tensors(tied=True)
    sources = sources_for(tensors, 2, True)
    for s in sources:
        s.aliases = {"model.embed_tokens.weight": ("lm_head.weight",)}
    plan = plan_tp(all_pieces(sources), 2, 8192, LAYOUT, 4, [0, 1, 2, 3],
                   aliases={"model.embed_tokens.weight": ("lm_head.weight",)})
    exp = Expected({n: (tuple(t.shape), "float32") for n, t in tensors.items()} | {"lm_head.weight": ((VOCAB, H),
                                                                                                     "float32")})
    for t in range(4):
        assert check_plan(plan.groups[t].plan, shard_expected(exp, LAYOUT, 4, t), f"tp {t}") == []
    # a tied alias (lm_head.weight) is no tensor of its own: loader_tensor finds its layout through the primary
    got = move(plan, sources, 3)
    assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"][768:])
    full = loader_tensor("lm_head.weight", got["model.embed_tokens.weight"], plan, 3)
    assert full.shape == (VOCAB, H) and torch.equal(full[768:], tensors["model.embed_tokens.weight"][768:])
    # a receiver that expects full shapes against a shard plan is told exactly what differs
    errors = check_plan(plan.groups[1].plan, exp, "receiver 1")
    assert any("q_proj" in e and "wrong shape" in e for e in errors)
    assert not any("norm" in e for e in errors)
    # an unknown tensor name is an error unless the layout has a default
    with pytest.raises(PlanError, match="no TP layout rule"):
        plan_tp([LocalPiece("mystery", (4,), "float32", 0, 4, 0)], 1, 4096, LAYOUT, 2, [0, 1])
    lax = TpLayout(LAYOUT.rules, default=REPLICATED)
    assert plan_tp([LocalPiece("mystery", (4,), "float32", 0, 4, 0)], 1, 4096, lax, 2, [0, 1]).total_bytes == 32


def test_wire_dtype_and_steps_order():
    tensors = model_tensors()
    sources = sources_for(tensors, 2, False)
    wire = {n: "bfloat16" for n in tensors}
    plan = plan_tp(all_pieces(sources), 2, 4096, LAYOUT, 2, [0, 1, 0, 1], wire_dtypes=wire)
    assert all(w.dtype == "bfloat16" for g in plan.groups.values() for w in g.plan.tensors.values())
    assert plan.full_bytes == sum(t.numel() * 2 for t in tensors.values())
    steps = plan.steps()
    assert steps == sorted(steps)  # round-major, tp ranks ascending: the same order on every rank
    for src in range(2):
        mine = plan.buckets_of(src)
        assert len(mine) == len(steps)
        assert sum(b is not None for _, b in mine) == sum(len([b for b in g.plan.buckets if b.src == src])
                                                          for g in plan.groups.values())


def test_against_vllm_weight_loaders():
    """vLLM's own layers (built for each tp rank, no process group) load the full checkpoint tensor and the
    checkpoint-shaped tensor made from our shard (``loader_tensor``) into identical parameters."""
    pytest.importorskip("vllm")
    import types

    import vllm.distributed.parallel_state as ps
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    tensors = model_tensors()
    sources = sources_for(tensors, 2, True)
    p = "model.layers.0."
    saved = ps._TP
    try:
        for tp in (2, 4, 8):
            plan = plan_tp(all_pieces(sources), 2, 8192, LAYOUT, tp, list(range(tp)))
            for t in range(tp):
                ps._TP = types.SimpleNamespace(rank_in_group=t, world_size=tp)
                got = move(plan, sources, t)
                kw = dict(bias=False, params_dtype=torch.float32)
                cases = [(lambda: QKVParallelLinear(H, HD, HEADS, KV, **kw),
                          [(p + f"self_attn.{x}_proj.weight", x) for x in "qkv"]),
                         (lambda: MergedColumnParallelLinear(H, [INTER, INTER], **kw),
                          [(p + "mlp.gate_proj.weight", 0), (p + "mlp.up_proj.weight", 1)]),
                         (lambda: RowParallelLinear(INTER, H, **kw), [(p + "mlp.down_proj.weight", None)]),
                         (lambda: RowParallelLinear(HEADS * HD, H, **kw), [(p + "self_attn.o_proj.weight", None)]),
                         (lambda: VocabParallelEmbedding(VOCAB, H, params_dtype=torch.float32),
                          [("model.embed_tokens.weight", None)]),
                         (lambda: ParallelLMHead(VOCAB, H, params_dtype=torch.float32), [("lm_head.weight", None)])]
                for make, loads in cases:
                    ref, ours = make(), make()
                    for layer, use_shard in ((ref, False), (ours, True)):
                        layer.weight.data.fill_(float("nan"))
                        for name, shard_id in loads:
                            w = loader_tensor(name, got[name], plan, t) if use_shard else tensors[name]
                            args = () if shard_id is None else (shard_id,)
                            layer.weight.weight_loader(layer.weight, w, *args)
                    assert torch.equal(ref.weight.data.nan_to_num(7.0), ours.weight.data.nan_to_num(7.0)), (tp, t, loads)
                    # and vLLM's parameter holds exactly our shards, in its fused order (padding rows aside)
                    parts = torch.cat([got[n] for n, _ in loads])
                    assert torch.equal(ref.weight.data[:parts.shape[0]], parts), (tp, t, loads)
    finally:
        ps._TP = saved
