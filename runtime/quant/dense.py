"""The dense mode ("none"): the weight in the engine's float dtype, y = x W^T + b."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import QuantMode, Stored, register


class DenseLinear:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.weight = tensors["weight"]  # (out, in)
        self.bias = tensors.get("bias")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Dense(QuantMode):
    name = "none"
    quantizes = False  # the build casts the rank's slice of the float weight: no quantize()

    def stored(self, shape, dtype):
        return {"weight": Stored(tuple(shape), dtype, ("out", "in"))}

    def linear(self, tensors):
        return DenseLinear(tensors)


register(Dense())
