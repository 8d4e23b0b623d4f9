"""Baichuan v1 / v2, 7B / 13B: LLaMA-shaped (RMSNorm, SwiGLU, MHA, no biases, untied head) with q, k, v
fused in `self_attn.W_pack` (rows q, k, v).

A trust_remote_code model on the hub: its modeling_baichuan.py is never run. What config.json leaves to
that code, the version says: 7B uses RoPE (base 10000), 13B ALiBi; v2's NormHead divides each lm_head
row by its L2 norm. The 13B code adds slope_h * j to the score of key j (slopes as BLOOM's, for any
head count); after the softmax that equals the runtime's slope_h * (j - i).
"""
import dataclasses

import torch.nn.functional as F

from runtime.spec import ModelSpec

from . import llama, register
from .base import Family, register_transform

VERSIONS = ("v1_7b", "v1_13b", "v2_7b", "v2_13b")


def detect_version(c: dict) -> str:
    """As vLLM tells them apart: only Baichuan-7B spells BaiChuanForCausalLM; Baichuan 2 has 125696
    tokens (v1: 64000); RoPE at width 4096 (the 7Bs), ALiBi at any other (the 13Bs: 5120)."""
    if "BaiChuanForCausalLM" in (c.get("architectures") or []):
        return "v1_7b"
    gen = "v2" if c["vocab_size"] == 125696 else "v1"
    return f"{gen}_{'7b' if c['hidden_size'] == 4096 else '13b'}"


def to_spec(c: dict, version: str) -> ModelSpec:
    # the 13B code reads model_max_length, the 7B code max_position_embeddings (Baichuan2-7B has both);
    # the rest is hardwired in the remote code whatever config.json says
    positions = c.get("max_position_embeddings") or c.get("model_max_length") or 4096
    spec = llama.to_spec({**c, "max_position_embeddings": positions, "rope_theta": 10000.0,
                          "num_key_value_heads": c["num_attention_heads"], "head_dim": None,
                          "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False})
    return dataclasses.replace(
        spec, family="baichuan", position="alibi" if version.endswith("13b") else "rope",
        add_bos_token=False,  # as Baichuan tokenizer_config.json files say; a source's own file wins (pipeline)
        extra={"version": version, "norm_head": version.startswith("v2")})


@register_transform("baichuan_norm_head")
def norm_head(t, spec: ModelSpec):
    """Baichuan 2's NormHead in eval mode: weight = F.normalize(weight) once, i.e. each row divided by
    max(||row||_2, 1e-12). Kept in fp32 (an fp32 engine of a half checkpoint gets the fp32 quotient, as
    the remote code loaded in fp32 does). v1 heads stay as they are."""
    return [F.normalize(t.float(), p=2.0, dim=1, eps=1e-12)] if spec.extra.get("norm_head") else [t]


_L = "model.layers.{}."
FAMILY = register(Family(
    model_type="baichuan",
    architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),  # 13B and v2; Baichuan-7B
    to_spec=to_spec,
    name_map={
        **llama.FAMILY.name_map,
        _L + "self_attn.W_pack.weight": ("split_qkv", [f"layers.{{}}.attn.{x}.weight" for x in "qkv"]),
        "lm_head.weight": ("baichuan_norm_head", "lm_head.weight"),
    },
    ignore=llama.FAMILY.ignore,  # Baichuan-7B's .bin files hold rotary_emb.inv_freq buffers
    tokenizer_class="LlamaTokenizer",  # Baichuan(2)Tokenizer (remote code) reads the same SentencePiece model
    versions=VERSIONS,
    detect_version=detect_version,
))
