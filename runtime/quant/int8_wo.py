"""int8_wo: INT8 weight-only, symmetric, one scale per output channel: w ≈ q * scale, q in [-127, 127].

Stored: weight (out, in) int8 and scale (out,) in the float dtype. Row-parallel shards keep the whole
scale (a row's scale is over all of its input features: quantized before sharding, so every tp gives
the world-1 engine's numbers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import GemvFusions, Stored, WeightOnlyMode, register, select_kernel


def smallest_scale(dtype: torch.dtype) -> float:
    """The smallest subnormal of dtype: a scale is never 0 (a row of zeros stays finite)."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


class Int8WeightOnlyLinear(GemvFusions):
    """y = (x Wq^T) s + b. The int8 matrix is what is read per step (half of fp16); under torch.compile
    the int8-to-float cast runs inside the matrix product (Inductor's mixed-dtype matmul), so the weight
    is never materialized in fp16. On CUDA the Triton kernel (runtime/quant/triton_wo.py) reads the int8
    weight and converts it in registers instead ($EF_WO_KERNEL=torch: this path). Sums of x times int8-sized values can overflow fp16 (max
    65504): x is scaled by 1/128 (a power of two: exact) and the scale by 128."""

    PRESCALE = 128.0

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.weight = tensors["weight"]  # (out, in) int8
        self.raw_scale = tensors["scale"].contiguous()  # (out,) float dtype
        self.scale = self.raw_scale * self.PRESCALE
        self.bias = tensors.get("bias")
        self.kernel = select_kernel(self.weight.device)
        self.init_fusions()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def kernel_operands(self) -> tuple:
        return self.weight, self.raw_scale, None, 8, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in ("triton", "cuda"):
            y = self.kernel_linear(x)
        else:
            y = F.linear(x * (1.0 / self.PRESCALE), self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


class Int8WeightOnly(WeightOnlyMode):
    name = "int8_wo"
    # measured: stories260K 2.7e-2 / 1.0, SmolLM2-135M 4.0e-2 / 0.99
    bounds = (1e-1, 0.85)

    def stored(self, shape, dtype):
        out, inp = shape
        return {"weight": Stored((out, inp), torch.int8, ("out", "in")), "scale": Stored((out,), dtype, ("out",))}

    def quantize(self, weight, dtype, stats=None):
        """The scale is rounded to the float dtype first, so the runtime's dequantization uses exactly
        the scale q was made with."""
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=smallest_scale(dtype)).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": q, "scale": scale}

    def linear(self, tensors):
        return Int8WeightOnlyLinear(tensors)


register(Int8WeightOnly())
