"""GPT-2: learned positions, LayerNorm with bias, GELU MLP, Conv1D weights stored (in, out)."""
from runtime.spec import ModelSpec

from . import register
from .base import Family

_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def to_spec(c: dict) -> ModelSpec:
    H = c["n_embd"]
    return ModelSpec(
        family="gpt2", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["n_layer"],
        num_heads=c["n_head"], num_kv_heads=c["n_head"], intermediate_size=c.get("n_inner") or 4 * H,
        max_position_embeddings=c["n_positions"], norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5),
        norm_bias=True, position="learned", mlp="plain", activation=_ACT[c.get("activation_function", "gelu_new")],
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=[c["eos_token_id"]] if c.get("eos_token_id") is not None else [],
    )


_H = "h.{}."
FAMILY = register(Family(
    model_type="gpt2",
    architectures=("GPT2LMHeadModel",),
    to_spec=to_spec,
    prefixes=("transformer.",),
    name_map={
        "wte.weight": "embed.weight",
        "wpe.weight": "pos_embed.weight",
        **{_H + f"ln_1.{w}": f"layers.{{}}.attn_norm.{w}" for w in ("weight", "bias")},
        _H + "attn.c_attn.weight": ("transpose_split_qkv", ["layers.{}.attn.q.weight", "layers.{}.attn.k.weight", "layers.{}.attn.v.weight"]),
        _H + "attn.c_attn.bias": ("split_qkv", ["layers.{}.attn.q.bias", "layers.{}.attn.k.bias", "layers.{}.attn.v.bias"]),
        _H + "attn.c_proj.weight": ("transpose", "layers.{}.attn.o.weight"),
        _H + "attn.c_proj.bias": "layers.{}.attn.o.bias",
        **{_H + f"ln_2.{w}": f"layers.{{}}.mlp_norm.{w}" for w in ("weight", "bias")},
        _H + "mlp.c_fc.weight": ("transpose", "layers.{}.mlp.up.weight"),
        _H + "mlp.c_fc.bias": "layers.{}.mlp.up.bias",
        _H + "mlp.c_proj.weight": ("transpose", "layers.{}.mlp.down.weight"),
        _H + "mlp.c_proj.bias": "layers.{}.mlp.down.bias",
        **{f"ln_f.{w}": f"final_norm.{w}" for w in ("weight", "bias")},
    },
    ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    tokenizer_class="GPT2Tokenizer",
))
