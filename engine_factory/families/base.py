"""What a family is: HF config -> ModelSpec, and a name map from HF tensor names to canonical ones.

A map value is either a canonical name template, or (transform, target templates): the named shared
transform turns the one HF tensor into the listed canonical tensors. "{}" stands for the layer index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from runtime.spec import ModelSpec

Target = Union[str, tuple]  # "layers.{}.attn.o.weight" | ("transpose", "layers.{}.attn.o.weight")


def _split_rows(t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    return list(t.split([spec.q_size, spec.kv_size, spec.kv_size], dim=0))


# Named transforms shared by all families: (tensor, spec) -> list of tensors, one per target.
TRANSFORMS: dict[str, Callable[[torch.Tensor, ModelSpec], list[torch.Tensor]]] = {
    # GPT-2's Conv1D stores (in, out): transpose to the (out, in) of nn.Linear.
    "transpose": lambda t, spec: [t.t().contiguous()],
    "split_qkv": lambda t, spec: _split_rows(t, spec),
    "transpose_split_qkv": lambda t, spec: _split_rows(t.t().contiguous(), spec),
}


@dataclass(frozen=True)
class Family:
    model_type: str
    architectures: tuple[str, ...]
    to_spec: Callable[[dict], ModelSpec]
    name_map: dict[str, Target]
    prefixes: tuple[str, ...] = ()  # optional leading parts of HF names (e.g. "transformer.")
    ignore: tuple[str, ...] = ()  # regexes of HF names that carry no weights (buffers)
    tokenizer_class: str | None = None  # when the source has no tokenizer_config.json
    _compiled: dict = field(default_factory=dict, compare=False, hash=False)

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
