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


@register_linear("int8_wo")
class Int8WeightOnlyLinear:
    """int8 weights with one float scale per output channel (engine_factory/quant.py): y = (x Wq^T) s + b.
    The int8 matrix is what is read per step (half of fp16); under torch.compile the int8-to-float cast
    runs inside the matrix product (Inductor's mixed-dtype matmul), so the weight is never materialized
    in fp16. Sums of x times int8-sized values can overflow fp16 (max 65504): x is scaled by 1/128
    (a power of two: exact) and the scale by 128."""

    PRESCALE = 128.0

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str):
        self.weight = tensors[f"{prefix}.weight"]  # (out, in) int8
        self.scale = tensors[f"{prefix}.scale"] * self.PRESCALE  # (out,) float dtype
        self.bias = tensors.get(f"{prefix}.bias")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * (1.0 / self.PRESCALE), self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def make_linear(mode: str, tensors: dict[str, torch.Tensor], prefix: str):
    try:
        cls = LINEARS[mode]
    except KeyError:
        raise ValueError(f"no runtime linear for quant mode {mode!r}; known: {sorted(LINEARS)}") from None
    return cls(tensors, prefix)
