"""A llama.cpp .gguf file of a LLaMA-architecture model: config from its metadata, weights dequantized
one tensor at a time into Hugging Face names and layout; tokenizer and reference through transformers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.errors import UserError

from ..families.base import unpermute_rotary
from . import Source, register_source
from .digests import file_digests

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names pass through, so that
    convert reports them with the family's other unknowns."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return name


def _meta(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_config(reader, path: Path) -> dict:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama'); convert the "
                        "original Hugging Face checkpoint instead and pass its folder as model.source")
    names = {t.name for t in reader.tensors}
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise UserError(f"{path}: uses rope scaling ({scaling}, rope_freqs), which the runtime does not "
                        "implement yet; use a model without rope scaling")
    k = lambda s, d=None: _meta(reader, f"llama.{s}", d)  # noqa: E731
    heads = int(k("attention.head_count"))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": int(k("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)),
        "hidden_size": int(k("embedding_length")), "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(k("attention.head_count_kv", heads)),
        "max_position_embeddings": int(k("context_length", 2048)),
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(k("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    if k("attention.key_length") is not None:
        cfg["head_dim"] = int(k("attention.key_length"))
    for hf_key, g_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{g_key}_token_id" in reader.fields:
            cfg[hf_key] = int(_meta(reader, f"tokenizer.ggml.{g_key}_token_id"))
    return cfg


def _iter_tensors(reader, cfg: dict):
    from gguf.quants import dequantize

    rows = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}

    def load(t):
        w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind in rows:
            w = unpermute_rotary(w, rows[kind])
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: F32 tensors are read-only mmaps

    for t in reader.tensors:
        yield _hf_name(t.name), (lambda t=t: load(t))


def _tokenizer_saver(path: Path):
    def save(dest: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(dest))
    return save


def _reference(path: Path):
    def load():
        # from_pretrained(gguf_file=) refuses to run without `accelerate`, which we do not depend on; for
        # llama it does no more than this: transformers' config and GGUF loader, into an fp32 model.
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        weights = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
            raise RuntimeError(f"{path}: transformers' GGUF loader left {missing} unset, {unexpected} unused")
        model.tie_weights()
        return model.eval()
    return load


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))  # memory-mapped: tensors are read when used
    except Exception as e:  # gguf raises ValueError / struct errors / OSError for bad files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None


def _peek(source: str, model_cfg) -> dict:
    path = Path(source).expanduser().resolve()
    return _hf_config(_reader(path), path)


@register_source(lambda s: s.lower().endswith(".gguf") and Path(s).expanduser().is_file(), peek=_peek)
def open_gguf(source: str, model_cfg, store) -> Source:
    path = Path(source).expanduser().resolve()
    reader = _reader(path)
    cfg = _hf_config(reader, path)
    # llama.cpp's flag says whether the model expects BOS (absent: SentencePiece vocabularies do, BPE ones
    # don't). The llama family's default (True) would put <|im_start|>, SmolLM2's BOS, before every prompt.
    add_bos = _meta(reader, "tokenizer.ggml.add_bos_token", _meta(reader, "tokenizer.ggml.model") == "llama")
    return Source(kind="gguf", name=path.stem.lower(), hf_config=cfg, path=path,
                  provenance={"type": "gguf", "path": str(path), "files": file_digests([path], path.parent, store)},
                  tokenizer_config={"add_bos_token": bool(add_bos)},
                  _tensors=lambda: _iter_tensors(reader, cfg), save_tokenizer=_tokenizer_saver(path),
                  _reference=_reference(path))
