"""Canonical checkpoint layout (what convert writes) and the runtime layout of a rank file."""
from __future__ import annotations

from runtime.spec import ModelSpec


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a converted checkpoint of `spec` holds: unfused q/k/v and gate/up, (out, in)."""
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    if spec.position == "learned":
        out["pos_embed.weight"] = (spec.max_position_embeddings, H)

    def norm(name):
        out[f"{name}.weight"] = (H,)
        if spec.norm_bias:
            out[f"{name}.bias"] = (H,)

    def linear(name, o, i, bias):
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    if spec.embedding_norm:
        norm("embed_norm")
    for i in range(spec.num_layers):
        p = f"layers.{i}"
        norm(f"{p}.attn_norm")
        linear(f"{p}.attn.q", spec.q_size, H, spec.qkv_bias)
        linear(f"{p}.attn.k", spec.kv_size, H, spec.qkv_bias)
        linear(f"{p}.attn.v", spec.kv_size, H, spec.qkv_bias)
        linear(f"{p}.attn.o", H, spec.q_size, spec.o_bias)
        norm(f"{p}.mlp_norm")
        if spec.mlp == "gated":
            linear(f"{p}.mlp.gate", I, H, spec.mlp_bias)
        linear(f"{p}.mlp.up", I, H, spec.mlp_bias)
        linear(f"{p}.mlp.down", H, I, spec.mlp_bias)
    norm("final_norm")
    if not spec.tie_word_embeddings:
        linear("lm_head", V, H, spec.lm_head_bias)
    return out


def is_norm(name: str) -> bool:
    return "norm." in name
