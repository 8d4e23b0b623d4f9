"""What a family is: HF config -> ModelSpec, and a name map from HF tensor names to canonical ones.

A map value is either a canonical name template, or (transform, target templates): the named shared
transform turns the one HF tensor into the listed canonical tensors. "{}" stands for the layer index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from runtime.errors import UserError
from runtime.spec import ModelSpec

Target = Union[str, tuple]  # "layers.{}.attn.o.weight" | ("transpose", "layers.{}.attn.o.weight")


def _split_rows(t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    return list(t.split([spec.q_size, spec.kv_size, spec.kv_size], dim=0))


def split_qkv_grouped(t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """Fused qkv rows grouped by KV head: (num_kv_heads, heads_per_kv + 2, head_dim), each group's query
    heads then its key and value head. BLOOM, MHA GPT-BigCode and Megatron are (num_heads, 3, head_dim);
    MQA GPT-BigCode is one group, the plain [q; k; v]. Weights (rows, H) and biases (rows,) alike."""
    g, rest = spec.num_heads // spec.num_kv_heads, tuple(t.shape[1:])
    rows = t.reshape(spec.num_kv_heads, g + 2, spec.head_dim, *rest)  # (nkv, g + 2, hd, [H])
    return [x.reshape(-1, *rest).contiguous() for x in rows.split([g, 1, 1], dim=1)]


def unpermute_rotary(w, n_head: int):
    """Meta / llama.cpp rotary row order -> HF's. They interleave each head's rows in pairs (x0, x1);
    HF keeps the two halves of a head apart. Works on torch tensors and numpy arrays, weights and biases."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


# Named transforms shared by all families: (tensor, spec) -> list of tensors, one per target.
TRANSFORMS: dict[str, Callable[[torch.Tensor, ModelSpec], list[torch.Tensor]]] = {
    # GPT-2's Conv1D stores (in, out): transpose to the (out, in) of nn.Linear.
    "transpose": lambda t, spec: [t.t().contiguous()],
    "split_qkv": lambda t, spec: _split_rows(t, spec),
    "split_qkv_grouped": split_qkv_grouped,
    "transpose_split_qkv": lambda t, spec: _split_rows(t.t().contiguous(), spec),
    "unpermute_q": lambda t, spec: [unpermute_rotary(t, spec.num_heads).contiguous()],
    "unpermute_k": lambda t, spec: [unpermute_rotary(t, spec.num_kv_heads).contiguous()],
}


def register_transform(name: str):
    """Add a named transform (a family file may register one that only it needs)."""
    def deco(fn):
        TRANSFORMS[name] = fn
        return fn
    return deco


@dataclass(frozen=True)
class Family:
    model_type: str
    architectures: tuple[str, ...]
    to_spec: Callable[[dict], ModelSpec]
    name_map: dict[str, Target]
    prefixes: tuple[str, ...] = ()  # optional leading parts of HF names (e.g. "transformer.")
    ignore: tuple[str, ...] = ()  # regexes of HF names that carry no weights (buffers)
    tokenizer_class: str | None = None  # when the source has no tokenizer_config.json
    versions: tuple[str, ...] = ()  # variants the checkpoint may not name (model.version picks one)
    detect_version: Callable[[dict], str] | None = None  # HF config -> one of versions
    _compiled: dict = field(default_factory=dict, compare=False, hash=False)

    def spec(self, hf_config: dict, version: str | None = None) -> ModelSpec:
        """HF config -> ModelSpec; versioned families get to_spec(config, version)."""
        if not self.versions:
            if version:
                raise UserError(f"model.version={version}: the {self.model_type} family has no versions; drop it")
            return self.to_spec(hf_config)
        version = version or self.detect_version(hf_config)
        if version not in self.versions:
            raise UserError(f"model.version={version} is not a {self.model_type} version; "
                            f"one of {', '.join(self.versions)}")
        return self.to_spec(hf_config, version)

    def map_name(self, hf_name: str, spec: ModelSpec) -> tuple[str | None, list[str]]:
        """HF name -> (transform or None, canonical names); ([],) for ignored; KeyError if unknown."""
        for pre in ("",) + self.prefixes:
            if pre and not hf_name.startswith(pre):
                continue
            name = hf_name[len(pre):]
            template = re.sub(r"\.(\d+)\.", ".{}.", name, count=1)
            layer = re.search(r"\.(\d+)\.", name)
            target = self.name_map.get(template)
            if target is None:
                continue
            idx = layer.group(1) if layer else None
            if isinstance(target, str):
                return None, [target.format(idx)]
            transform, outs = target
            outs = [outs] if isinstance(outs, str) else list(outs)
            return transform, [o.format(idx) for o in outs]
        if any(re.fullmatch(p, hf_name) for p in self.ignore):
            return None, []
        if spec.tie_word_embeddings and hf_name.endswith("lm_head.weight"):
            return None, []  # a tied head saved anyway is the embedding again
        raise KeyError(hf_name)
