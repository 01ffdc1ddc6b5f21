"""Qwen3-shaped tensor lists shared by the GPU benchmarks (names and shapes as in the HF checkpoint)."""


def attention_shapes(p: str, hidden: int, q_heads: int, kv_heads: int, head_dim: int) -> list:
    """One Qwen3 layer's attention (prefix ``p``): the same in the dense and the MoE models."""
    return [(p + "self_attn.q_proj.weight", (q_heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)),
            (p + "self_attn.k_norm.weight", (head_dim,))]


def qwen3_shapes(layers=36, hidden=4096, inter=12288, vocab=151936, q_heads=32, kv_heads=8, head_dim=128):
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += attention_shapes(p, hidden, q_heads, kv_heads, head_dim) + [
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def qwen3_moe_shapes(layers=24, hidden=2048, experts=128, width=768, vocab=151936, q_heads=32, kv_heads=4,
                     head_dim=128):
    """Qwen3-30B-A3B's widths (48 layers there) in transformers 5's layout: each layer's experts fused into
    ``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, beside the router ``mlp.gate [E, H]``."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += attention_shapes(p, hidden, q_heads, kv_heads, head_dim) + [
                   (p + "mlp.gate.weight", (experts, hidden)),
                   (p + "mlp.experts.gate_up_proj", (experts, 2 * width, hidden)),
                   (p + "mlp.experts.down_proj", (experts, hidden, width)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes
