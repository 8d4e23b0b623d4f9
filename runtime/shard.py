"""The one shard plan of the runtime layout: which part of each tensor a rank holds. The build cuts rank
files with it and the decoder's shapes follow from it (both read this table; it knows no family).

Styles (gpt-fast's colwise/rowwise, torchtune's plan of name patterns):
  column   split dim 0 (output features), segment by segment: attn.qkv = [q heads | k heads | v heads]
           (a rank takes its q heads and the KV heads they read: copied when tp exceeds the KV heads),
           mlp.up = [gate | up]; the outputs stay sharded for the next linear
  row      split dim 1 (input features); a 1-D bias has no dim 1, so it is whole: added once after the
           all-reduce of the partial products
  vocab    split dim 0 by vocabulary rows, padded with zero rows to a multiple of tp (the lm_head, and
           the embedding with embedding_sharding=vocab); the runtime trims the padding from the logits
  hidden   split dim 1 (the embedding with embedding_sharding=hidden; the runtime all-gathers)
Any tensor stored under a linear's prefix (a quant mode's `scale`, a packed weight) takes the linear's
rule mapped onto its own dims: `follows` (runtime/quant Stored) names the weight's dim ("out" = 0,
"in" = 1) each of its dims is cut with; without it, dims by position. A per-output-channel scale
("out",) of a column-parallel weight splits with the same segments; of a row-parallel weight it has no
"in" dim and is replicated; a group scale ("out", "in") of a row-parallel weight splits by groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .parallel import RankLayout


@dataclass(frozen=True)
class Split:
    """dim is made of segments (in units); the rank takes, per segment, a range of its units. A range
    past a segment's end is padding (zero rows)."""
    dim: int
    segments: tuple[int, ...]
    take: tuple[range, ...]


def _one_of_tp(L: RankLayout, dim: int, segments: int = 1) -> Split:
    return Split(dim, (L.tp,) * segments, (range(L.tp_rank, L.tp_rank + 1),) * segments)


def _vocab(L: RankLayout) -> Split:
    return Split(0, (L.vocab_size,), (L.vocab,))


def _embedding(L: RankLayout) -> Split | None:
    return {"vocab": _vocab, "hidden": lambda L: _one_of_tp(L, 1), "none": lambda L: None}[L.embedding_sharding](L)


_STYLES: dict[str, Callable[[RankLayout], Split | None]] = {
    "replicated": lambda L: None,
    "column_qkv": lambda L: Split(0, (L.num_heads, L.num_kv_heads, L.num_kv_heads), (L.heads, L.kv_heads, L.kv_heads)),
    "column_up": lambda L: _one_of_tp(L, 0, 2 if L.mlp_gated else 1),
    "row": lambda L: _one_of_tp(L, 1),
    "vocab": _vocab,
    "embedding": _embedding,  # vocab | hidden | replicated, by the mapping's embedding_sharding
}

PLAN: dict[str, str] = {  # runtime tensor name pattern ({i}: a layer, *: any suffix) -> style
    "embed.weight": "embedding",
    "pos_embed.weight": "replicated",  # positions: small, added after the embedding is whole
    "embed_norm.*": "replicated",
    "layers.{i}.attn_norm.*": "replicated",
    "layers.{i}.attn.qkv.*": "column_qkv",
    "layers.{i}.attn.o.*": "row",
    "layers.{i}.mlp_norm.*": "replicated",
    "layers.{i}.mlp.up.*": "column_up",
    "layers.{i}.mlp.down.*": "row",
    "layers.{i}.kv_cache.*": "replicated",  # per-layer K/V scales of a quantized KV cache
    "final_norm.*": "replicated",
    "lm_head.*": "vocab",
}
_PATTERNS = [(re.compile(re.escape(p).replace(r"\{i\}", r"\d+").replace(r"\*", r".+") + "$"), s)
             for p, s in PLAN.items()]
_LAYER = re.compile(r"layers\.(\d+)\.")


def style_of(name: str) -> str:
    for pattern, style in _PATTERNS:
        if pattern.match(name):
            return style
    raise KeyError(f"{name}: not a tensor of the runtime layout (runtime/shard.py PLAN)")


_WEIGHT_DIMS = ("out", "in")


def _spans(name: str, shape: tuple[int, ...], layout: RankLayout, follows: tuple[str, ...] | None = None):
    """None (the whole tensor) or (dim, [(start, stop, zero rows after)]) in elements of this tensor."""
    split = _STYLES[style_of(name)](layout) if layout.tp > 1 else None
    if split is None:
        return None
    dim = split.dim
    if follows is not None:  # a quant tensor: cut along its dim that follows the weight's split dim
        if _WEIGHT_DIMS[dim] not in follows:
            return None
        dim = follows.index(_WEIGHT_DIMS[dim])
    if len(shape) <= dim:
        return None
    units = sum(split.segments)
    if shape[dim] % units:
        raise ValueError(f"{name}: dim {dim} of {tuple(shape)} is not a multiple of its {units} units")
    u, spans, offset = shape[dim] // units, [], 0
    for seg, take in zip(split.segments, split.take):
        start, stop = min(take.start, seg), min(take.stop, seg)
        spans.append(((offset + start) * u, (offset + stop) * u, (len(take) - (stop - start)) * u))
        offset += seg
    return dim, spans


def shard_shape(name: str, full_shape, layout: RankLayout, follows: tuple[str, ...] | None = None) -> tuple[int, ...]:
    """The shape of this rank's part of a tensor whose world-1 shape is full_shape."""
    full_shape = tuple(full_shape)
    cut = _spans(name, full_shape, layout, follows)
    if cut is None:
        return full_shape
    dim, spans = cut
    return full_shape[:dim] + (sum(b - a + pad for a, b, pad in spans),) + full_shape[dim + 1:]


class Sliceable(Protocol):
    """A tensor, or anything that reads parts of one (safetensors get_slice): .shape and .narrow."""
    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def shard_tensor(name: str, full: Sliceable, layout: RankLayout, follows: tuple[str, ...] | None = None) -> torch.Tensor:
    """This rank's part of `full` (the world-1 tensor, or a reader of its parts: only the parts this
    rank holds are read)."""
    shape = tuple(full.shape)
    cut = _spans(name, shape, layout, follows)
    if cut is None:
        return full if isinstance(full, torch.Tensor) else full.narrow(0, 0, shape[0])
    dim, spans = cut
    parts, pads = [], []
    for a, b, pad in spans:
        if b > a:
            parts.append(full.narrow(dim, a, b - a))
        if pad:
            pads.append((len(parts) + len(pads), pad))
    like = parts[0] if parts else full.narrow(dim, 0, 0)  # the padding's dtype, without reading more
    for at, pad in pads:
        parts.insert(at, torch.zeros(shape[:dim] + (pad,) + shape[dim + 1:], dtype=like.dtype, device=like.device))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def rank_tensor_names(layout: RankLayout, all_names) -> list[str]:
    """The runtime names this rank holds, from the names of the world-1 engine: its stage's layers; the
    embeddings on the first stage; the final norm and lm_head on the last, where a tied model gets an
    `lm_head.weight` of its own unless the lm_head is this rank's embedding table (head_uses_embed)."""
    out = []
    for name in all_names:
        i = layer_of(name)
        if i is not None:
            keep = i in layout.layers
        elif name.startswith(("embed.", "pos_embed.", "embed_norm.")):
            keep = layout.first_stage
        elif name.startswith(("final_norm.", "lm_head.")):
            keep = layout.last_stage
        else:
            style_of(name)  # raises on a name outside the layout
            keep = True
        if keep:
            out.append(name)
    if layout.tied and layout.last_stage and not layout.head_uses_embed and "lm_head.weight" not in out:
        out.append("lm_head.weight")
    return out
