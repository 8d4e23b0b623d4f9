"""The dense mode ("none"): the weight in the engine's float dtype, y = x W^T + b."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import QuantMode, Stored, register


def cpu_gemv_layout(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 (out, in) weight on the CPU as the same (out, in) tensor with its in-features outermost in memory
    (`w.t().contiguous().t()`): F.linear then multiplies by the contiguous (in, out) matrix, which the CPU's BLAS
    reads faster for a few rows of x (2026-12-07, 2 threads of an AMD EPYC, torch 2.13: SmolLM2-135M's 49,152 x
    576 lm_head 6.8 -> 4.3 ms at batch 1, its 30 layers' linears streamed from memory 25.5 -> 21 ms; at 32 rows
    equal or faster). bf16 reads faster as stored (2.5 vs 4.1 ms): other dtypes, and GPU tensors, are kept."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return weight
    return weight.t().contiguous().t()


class DenseLinear:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.weight = cpu_gemv_layout(tensors["weight"])  # (out, in)
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
