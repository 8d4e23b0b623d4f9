"""Meta's own LLaMA checkpoints: params.json + consolidated.NN.pth, one file per tensor-parallel rank of Meta's
training (7B: 1, 13B: 2, 70B: 8), and tokenizer.model beside them or one folder up (as Meta's download.sh lays
it out). Each tensor's shards are merged as it is read, renamed to Hugging Face names and q/k rows un-permuted,
so the llama family converts it. No transformers class reads this format: validate has no reference."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from runtime.errors import UserError

from ..families.base import unpermute_rotary
from . import Source, read_json, register_source
from .digests import file_digests

# Meta name -> (HF name, dim along which Meta's model-parallel shards are concatenated; None: replicated).
# fairscale's ColumnParallelLinear splits rows (dim 0), RowParallelLinear columns (dim 1); LLaMA 1/2's
# ParallelEmbedding splits the hidden dim (LLaMA 3's VocabParallelEmbedding the vocabulary: see _merge).
_TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
        "output.weight": ("lm_head.weight", 0)}
_BLOCK = {"attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
          "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
          "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w3": ("mlp.up_proj", 0),
          "feed_forward.w2": ("mlp.down_proj", 1), "attention_norm": ("input_layernorm", None),
          "ffn_norm": ("post_attention_layernorm", None)}
_BUFFERS = ("rope.freqs",)  # LLaMA 1 saved its rotary table


def _hf_name(name: str) -> tuple[str, int | None]:
    """layers.3.attention.wq.weight -> (model.layers.3.self_attn.q_proj.weight, 0); unknown names pass
    through (replicated), so that convert reports them with the family's other unknowns."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK:
        hf, dim = _BLOCK[m.group(2)]
        return f"model.layers.{m.group(1)}.{hf}.{m.group(3)}", dim
    return _TOP.get(name, (name, None))


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size exactly as Meta's model.py computes it (7B: 11008, 70B: 28672)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _hf_config(params: dict, shards: list[dict], path: Path, sp_ids: dict) -> dict:
    if params.get("use_scaled_rope") or params.get("rope_scaling"):
        raise UserError(f"{path}/params.json: uses rope scaling, which the runtime does not implement yet")
    dim, heads, n = params["dim"], params["n_heads"], len(shards)
    emb = shards[0]["tok_embeddings.weight"]  # (V, H / n) sharded along hidden, (V / n, H) along the vocab
    rows = emb.shape[0] * (n if emb.shape[1] == dim else 1)
    vocab = params.get("vocab_size", -1)
    if vocab not in (-1, rows):
        raise UserError(f"{path}/params.json: vocab_size {vocab}, but tok_embeddings has {rows} rows")
    ffn = ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    w1 = shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * n
    if w1 != ffn:
        raise UserError(f"{path}: params.json (multiple_of, ffn_dim_multiplier) implies a feed-forward size of "
                        f"{ffn}, but feed_forward.w1 has {w1} rows; the weights and params.json disagree")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": rows, "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": params["n_layers"],
            "num_attention_heads": heads, "num_key_value_heads": params.get("n_kv_heads") or heads,
            "rms_norm_eps": params.get("norm_eps", 1e-5), "rope_theta": float(params.get("rope_theta", 10000.0)),
            # not in Meta's params.json (a generation argument there): LLaMA 2's context unless it says
            "max_position_embeddings": params.get("max_seq_len", 4096), "tie_word_embeddings": False, **sp_ids}


def _iter_tensors(shards: list[dict], cfg: dict):
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}

    def load(name: str, hf: str, dim: int | None) -> torch.Tensor:
        parts = [sd[name] for sd in shards]  # mmaps: only this tensor's pages are read, merged once
        if name == "tok_embeddings.weight" and parts[0].shape[1] == cfg["hidden_size"]:
            dim = 0  # LLaMA 3 shards the embedding along the vocabulary
        t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)  # None: replicated
        kind = hf.split(".")[-2]
        return unpermute_rotary(t, heads[kind]) if kind in heads else t

    for name in shards[0]:
        if name not in _BUFFERS:
            hf, dim = _hf_name(name)
            yield hf, (lambda name=name, hf=hf, dim=dim: load(name, hf, dim))


def sentencepiece_ids(model_proto: bytes) -> dict:
    """bos / eos / pad ids of a SentencePiece model; {} when it is not one (LLaMA 3 ships tiktoken's)."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except Exception:  # sentencepiece raises RuntimeError / its own parse errors
        return {}
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def sentencepiece_saver(read: Callable[[], bytes], where: str, **kwargs) -> Callable[[Path], None]:
    """Saves a SentencePiece model as a transformers tokenizer (LlamaTokenizer reads one named tokenizer.model)."""
    def save(dest: Path) -> None:
        from transformers import LlamaTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(read())
            try:
                tok = LlamaTokenizer.from_pretrained(tmp, **kwargs)
            except Exception as e:
                raise UserError(f"{where}: not a SentencePiece tokenizer ({type(e).__name__}: {e}); pass "
                                "model.tokenizer=<Hugging Face tokenizer folder>") from None
        tok.save_pretrained(str(dest))
    return save


def _is_meta(source: str) -> bool:
    p = Path(source).expanduser()
    return p.is_dir() and (p / "params.json").is_file() and any(p.glob("consolidated.*.pth"))


@register_source(_is_meta, first=True)  # before hf_folder, which takes any folder
def open_meta(source: str, model_cfg, store) -> Source:
    path = Path(source).expanduser().resolve()
    files = sorted(path.glob("consolidated.*.pth"))
    if [f.name for f in files] != [f"consolidated.{i:02d}.pth" for i in range(len(files))]:
        raise UserError(f"{path}: shards {[f.name for f in files]} are not numbered 00, 01, ..; is it complete?")
    shards = []
    for f in files:
        try:  # never unpickle code; mmap: a tensor's pages are read when it is merged
            shards.append(torch.load(str(f), map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise UserError(f"{f}: cannot be read as a weights-only PyTorch checkpoint ({e}); re-download it") from None
        if set(shards[-1]) != set(shards[0]):
            raise UserError(f"{f}: holds other tensors than {files[0].name}; the shards are of different models")
    params = read_json(path / "params.json", "Meta's model parameters")
    tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").is_file()), None)
    try:
        cfg = _hf_config(params, shards, path, sentencepiece_ids(tok.read_bytes()) if tok else {})
    except KeyError as e:
        raise UserError(f"{path}: params.json or the shards lack {e}; is this a Meta LLaMA checkpoint?") from None
    digests = {**file_digests([path / "params.json", *files], path, store),
               **(file_digests([tok], tok.parent, store) if tok else {})}
    return Source(kind="meta", name=path.name.lower(), hf_config=cfg, path=path,
                  provenance={"type": "meta", "path": str(path), "files": digests},
                  _tensors=lambda: _iter_tensors(shards, cfg),
                  save_tokenizer=sentencepiece_saver(tok.read_bytes, str(tok)) if tok else None,
                  no_reference="Meta's consolidated.*.pth format has no transformers reader (transformers' "
                               "convert_llama_weights_to_hf.py makes an HF folder to compare with)")
