"""LLaMA 1/2/3 (and every LLaMA-shaped checkpoint): the defaults of the canonical layout."""
from runtime.spec import ModelSpec

from . import register
from .base import Family


def to_spec(c: dict) -> ModelSpec:
    eos = c.get("eos_token_id")
    return ModelSpec(
        family="llama", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or 0, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        norm="rms", norm_eps=c.get("rms_norm_eps", 1e-6), position="rope",
        rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        mlp="gated", activation={"silu": "silu", "gelu": "gelu"}[c.get("hidden_act", "silu")],
        qkv_bias=c.get("attention_bias", False), o_bias=c.get("attention_bias", False),
        mlp_bias=c.get("mlp_bias", False), tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos if isinstance(eos, list) else [eos] if eos is not None else [],
        pad_token_id=c.get("pad_token_id"), add_bos_token=True,
    )


_L = "model.layers.{}."
FAMILY = register(Family(
    model_type="llama",
    architectures=("LlamaForCausalLM",),
    to_spec=to_spec,
    name_map={
        "model.embed_tokens.weight": "embed.weight",
        _L + "input_layernorm.weight": "layers.{}.attn_norm.weight",
        **{_L + f"self_attn.{x}_proj.{w}": f"layers.{{}}.attn.{x}.{w}" for x in "qkvo" for w in ("weight", "bias")},
        _L + "post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
        **{_L + f"mlp.{x}_proj.{w}": f"layers.{{}}.mlp.{x}.{w}" for x in ("gate", "up", "down") for w in ("weight", "bias")},
        "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    ignore=(r".*rotary_emb\.inv_freq",),
    tokenizer_class="LlamaTokenizer",
))
