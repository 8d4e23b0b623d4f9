"""Linear layers by quantization mode: a registry the loader picks from (engine.json's quant mode).

Each class takes the tensors stored under one prefix of a rank file and is called like F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LINEARS: dict[str, type] = {}


def register_linear(mode: str):
    def deco(cls):
        LINEARS[mode] = cls
        return cls
    return deco


@register_linear("none")
class DenseLinear:
    """y = x W^T + b, weights in the engine's float dtype."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str):
        self.weight = tensors[f"{prefix}.weight"]  # (out, in)
        self.bias = tensors.get(f"{prefix}.bias")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def make_linear(mode: str, tensors: dict[str, torch.Tensor], prefix: str):
    try:
        cls = LINEARS[mode]
    except KeyError:
        raise ValueError(f"no runtime linear for quant mode {mode!r}; known: {sorted(LINEARS)}") from None
    return cls(tensors, prefix)
