"""NeMo / Megatron GPT ("GPT-Next", e.g. nvidia/GPT-2B-001). Config: NeMo's model_config.yaml keys, plus
vocab_size (the embedding's padded rows) and the tokenizer's bos/eos ids, which the .nemo source adds."""
import torch

from runtime.errors import UserError
from runtime.spec import ModelSpec

from . import register
from .base import Family, register_transform

_GLU = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
_NORM = {"layernorm": "layer", "layernorm1p": "layer", "rmsnorm": "rms"}
_POS = {"rope": "rope", "learned_absolute": "learned"}


def _check(key: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"gpt_next: {key}={value} is not supported; one of {', '.join(map(str, allowed))}")


def to_spec(c: dict) -> ModelSpec:
    act, norm = c.get("activation", "gelu"), c.get("normalization", "layernorm")
    pos, bias = c.get("position_embedding_type", "learned_absolute"), c.get("bias", True)
    _check("activation", act, ["gelu", "relu", *_GLU, *(f"fast-{a}" for a in _GLU)])
    _check("normalization", norm, list(_NORM))
    _check("position_embedding_type", pos, list(_POS))
    _check("transformer_block_type", c.get("transformer_block_type", "pre_ln"), ["pre_ln"])
    _check("seq_len_interpolation_factor", c.get("seq_len_interpolation_factor"), [None])
    base = act.removeprefix("fast-")
    if base in ("gelu", "geglu") and (c.get("openai_gelu") or (bias and c.get("bias_activation_fusion", True))):
        base = "gelu_tanh"  # Megatron's fused bias-gelu kernel is the tanh approximation
    H, heads = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("kv_channels") or H // heads
    return ModelSpec(
        family="gpt_next", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["num_layers"],
        num_heads=heads, num_kv_heads=c.get("num_query_groups") or heads, head_dim=hd,
        intermediate_size=c["ffn_hidden_size"],
        max_position_embeddings=c.get("max_position_embeddings") or c.get("encoder_seq_length") or c["seq_length"],
        norm=_NORM[norm], norm_eps=c.get("layernorm_epsilon", 1e-5), norm_bias=norm != "rmsnorm",
        position=_POS[pos], rope_theta=float(c.get("rotary_base", 10000)),
        rotary_dim=int(hd * c.get("rotary_percentage", 1.0)) if pos == "rope" else 0,
        mlp="gated" if act.removeprefix("fast-") in _GLU else "plain",
        activation=_GLU.get(base, base), qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        tie_word_embeddings=c.get("share_embeddings_and_output_weights", True),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=[c["eos_token_id"]] if "eos_token_id" in c else [],
        pad_token_id=c.get("pad_token_id"), add_bos_token=False,  # NeMo's generation adds no BOS by default
        extra={"layernorm1p": norm == "layernorm1p"},
    )


@register_transform("megatron_h_to_4h")
def _split_h_to_4h(t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """Targets (up, gate). The fast-*glu layer is [gate; up]: Megatron chunks it in two and applies the
    activation to the first half. A plain MLP's is the up projection alone (its one target)."""
    if spec.mlp != "gated":
        return [t]
    gate, up = t.chunk(2, dim=0)
    return [up, gate]


@register_transform("layernorm1p")
def _norm_weight(t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    # layernorm1p stores gamma - 1 (zero-centred); add 1 in fp32, where a bf16 weight near 1 keeps its bits
    return [t.float() + 1 if spec.extra.get("layernorm1p") else t]


_L = "encoder.layers.{}."
_NORMS = {_L + "input_layernorm": "layers.{}.attn_norm", _L + "post_attention_layernorm": "layers.{}.mlp_norm",
          "encoder.final_layernorm": "final_norm"}
FAMILY = register(Family(
    model_type="gpt_next",
    architectures=("MegatronGPTModel",),
    to_spec=to_spec,
    prefixes=("model.language_model.", "model.module.language_model."),  # the latter: megatron_amp_O2
    name_map={
        "embedding.word_embeddings.weight": "embed.weight",
        "embedding.position_embeddings.weight": "pos_embed.weight",
        **{f"{n}.weight": ("layernorm1p", f"{c}.weight") for n, c in _NORMS.items()},
        **{f"{n}.bias": f"{c}.bias" for n, c in _NORMS.items()},
        **{f"{_L}self_attention.query_key_value.{w}": ("split_qkv_grouped", [f"layers.{{}}.attn.{x}.{w}" for x in "qkv"])
           for w in ("weight", "bias")},
        **{f"{_L}self_attention.dense.{w}": f"layers.{{}}.attn.o.{w}" for w in ("weight", "bias")},
        **{f"{_L}mlp.dense_h_to_4h.{w}": ("megatron_h_to_4h", [f"layers.{{}}.mlp.{x}.{w}" for x in ("up", "gate")])
           for w in ("weight", "bias")},
        **{f"{_L}mlp.dense_4h_to_h.{w}": f"layers.{{}}.mlp.down.{w}" for w in ("weight", "bias")},
        "output_layer.weight": "lm_head.weight",
    },
    ignore=(r".*rotary_pos_emb\.inv_freq", r".*\._extra_state"),
    tokenizer_class="LlamaTokenizer",
))
