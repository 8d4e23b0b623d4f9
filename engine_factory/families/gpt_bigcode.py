"""GPT-BigCode (SantaCoder, StarCoder): GPT-2 with multi-query attention and nn.Linear weights (out, in)."""
from runtime.errors import UserError
from runtime.spec import ModelSpec

from . import register
from .base import Family

_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
        "relu": "relu"}


def to_spec(c: dict) -> ModelSpec:
    act = c.get("activation_function", "gelu_pytorch_tanh")
    if act not in _ACT:
        raise UserError(f"gpt_bigcode: activation_function={act!r} is not supported; one of {', '.join(_ACT)}")
    if not c.get("scale_attn_weights", True):
        raise UserError("gpt_bigcode: scale_attn_weights=false (unscaled attention) is not supported")
    H, n = c["n_embd"], c["n_head"]
    eos = c.get("eos_token_id")
    return ModelSpec(
        family="gpt_bigcode", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["n_layer"],
        num_heads=n, num_kv_heads=1 if c.get("multi_query", True) else n,
        intermediate_size=c.get("n_inner") or 4 * H, max_position_embeddings=c["n_positions"],
        norm="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5), norm_bias=True, position="learned",
        mlp="plain", activation=_ACT[act], qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", True), bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos if isinstance(eos, list) else [eos] if eos is not None else [],
        pad_token_id=c.get("pad_token_id"),
    )


_H = "h.{}."
_QKV = ["layers.{}.attn.q", "layers.{}.attn.k", "layers.{}.attn.v"]
_SAME = {  # HF module -> canonical module; weight and bias alike
    _H + "ln_1": "layers.{}.attn_norm",
    _H + "attn.c_proj": "layers.{}.attn.o",
    _H + "ln_2": "layers.{}.mlp_norm",
    _H + "mlp.c_fc": "layers.{}.mlp.up",
    _H + "mlp.c_proj": "layers.{}.mlp.down",
    "ln_f": "final_norm",
}
FAMILY = register(Family(
    model_type="gpt_bigcode",
    architectures=("GPTBigCodeForCausalLM",),
    to_spec=to_spec,
    name_map={
        "wte.weight": "embed.weight",
        "wpe.weight": "pos_embed.weight",
        **{f"{hf}.{w}": f"{ours}.{w}" for hf, ours in _SAME.items() for w in ("weight", "bias")},
        # MQA: [q (n_embd rows); k (head_dim); v (head_dim)] = one KV group; MHA: (n_head, 3, head_dim)
        **{_H + f"attn.c_attn.{w}": ("split_qkv_grouped", [f"{x}.{w}" for x in _QKV]) for w in ("weight", "bias")},
        "lm_head.weight": "lm_head.weight",
    },
    prefixes=("transformer.",),
    tokenizer_class="PreTrainedTokenizerFast",  # the hub's SantaCoder / StarCoder ship tokenizer.json
))
