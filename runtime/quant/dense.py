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

    def row_blocks(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """__call__'s output in n equal blocks of outputs, one product each over a view of the weight's rows (a
        gated MLP's gate and up: cuBLAS picks its GEMV per shape, $EF_SPLIT_GATE_UP in runtime/model.py)."""
        bias = self.bias.chunk(n) if self.bias is not None else (None,) * n
        return tuple(F.linear(x, w, b) for w, b in zip(self.weight.chunk(n), bias))


class Dense(QuantMode):
    name = "none"
    quantizes = False  # the build casts the rank's slice of the float weight: no quantize()

    def stored(self, shape, dtype):
        return {"weight": Stored(tuple(shape), dtype, ("out", "in"))}

    def linear(self, tensors):
        return DenseLinear(tensors)


register(Dense())
