"""InternLM (v1: 7B, 20B): LLaMA with biases on q, k, v and o as config.json's `bias` says.

A trust_remote_code model on the hub: its modeling_internlm.py is never run; LLaMA's name map reads it.
Its config names the rotary base `rotary.base` (20B: `rope_theta`); the code's "dynamic" NTK rotary only
departs from plain RoPE past max_position_embeddings, which a rope engine's limits never reach.
"""
import dataclasses

from runtime.spec import ModelSpec

from . import llama, register
from .base import Family


def to_spec(c: dict) -> ModelSpec:
    theta = (c.get("rotary") or {}).get("base") or c.get("rope_theta") or 10000.0
    bias = c.get("bias", True)  # InternLMConfig's default; internlm-20b's config says false
    spec = llama.to_spec({**c, "rope_theta": float(theta), "attention_bias": bias})
    return dataclasses.replace(spec, family="internlm")


FAMILY = register(Family(
    model_type="internlm",
    architectures=("InternLMForCausalLM",),
    to_spec=to_spec,
    name_map=llama.FAMILY.name_map,  # the same names, biases included
    ignore=llama.FAMILY.ignore,
    tokenizer_class="LlamaTokenizer",  # InternLMTokenizer (remote code) reads the same SentencePiece model
))
