"""BLOOM: ALiBi, a layer norm on the word embeddings, GELU (tanh) MLP, biases everywhere, fused qkv."""
from runtime.errors import UserError
from runtime.spec import ModelSpec

from . import register
from .base import Family


def _first(c: dict, *keys: str):
    """BLOOM's own config.json files spell some fields the Megatron way (n_embed, num_attention_heads)."""
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    raise KeyError(keys[0])


def to_spec(c: dict) -> ModelSpec:
    if c.get("apply_residual_connection_post_layernorm"):
        raise UserError("bloom: apply_residual_connection_post_layernorm=true (the residual is the normed "
                        "input) is not supported by the runtime's pre-norm blocks")
    H, n = _first(c, "hidden_size", "n_embed"), _first(c, "n_head", "num_attention_heads")
    eos = c.get("eos_token_id")
    return ModelSpec(
        family="bloom", vocab_size=c["vocab_size"], hidden_size=H,
        num_layers=_first(c, "n_layer", "num_hidden_layers"), num_heads=n, num_kv_heads=n,
        intermediate_size=4 * H,
        # ALiBi has no position table; seq_length is what it was trained on (only informative here)
        max_position_embeddings=c.get("seq_length") or 2048, position="alibi",
        norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5), norm_bias=True, embedding_norm=True,
        mlp="plain", activation="gelu_tanh",  # bloom_gelu: the tanh approximation
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
        eos_token_ids=eos if isinstance(eos, list) else [eos] if eos is not None else [],
    )


_H = "h.{}."
_QKV = ["layers.{}.attn.q", "layers.{}.attn.k", "layers.{}.attn.v"]
_SAME = {  # HF module -> canonical module; weight and bias alike
    "word_embeddings_layernorm": "embed_norm",
    _H + "input_layernorm": "layers.{}.attn_norm",
    _H + "self_attention.dense": "layers.{}.attn.o",
    _H + "post_attention_layernorm": "layers.{}.mlp_norm",
    _H + "mlp.dense_h_to_4h": "layers.{}.mlp.up",
    _H + "mlp.dense_4h_to_h": "layers.{}.mlp.down",
    "ln_f": "final_norm",
}
FAMILY = register(Family(
    model_type="bloom",
    architectures=("BloomForCausalLM",),
    to_spec=to_spec,
    name_map={
        "word_embeddings.weight": "embed.weight",
        **{f"{hf}.{w}": f"{ours}.{w}" for hf, ours in _SAME.items() for w in ("weight", "bias")},
        **{_H + f"self_attention.query_key_value.{w}": ("split_qkv_grouped", [f"{x}.{w}" for x in _QKV])
           for w in ("weight", "bias")},
        "lm_head.weight": "lm_head.weight",
    },
    prefixes=("transformer.",),  # BloomForCausalLM saves "transformer.h.0…"; files saved from BloomModel: "h.0…"
    tokenizer_class="PreTrainedTokenizerFast",  # BLOOM ships tokenizer.json only
))
