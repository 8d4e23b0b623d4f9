"""int4_wo, int4_wo_g128, int4_wo_g64, int4_wo_g32: INT4 weight-only, asymmetric, one scale and zero point
per output channel (int4_wo) or per group of 128 / 64 / 32 consecutive input features.

w ≈ (q - zero) * scale, q and zero integers in [0, 15]. Asymmetric (GPTQ / AWQ style): the 16 levels
span each group's [min(w, 0), max(w, 0)], finer than symmetric's [-max|w|, max|w|] on skewed groups at
the cost of one byte per group; 0 is a level (zero is an integer), so a zero weight stays exactly zero.
The range is not clipped: a search for the shrink with the least squared weight error per group (AWQ /
HQQ's clipping) cut SmolLM2-135M's weight error at g64 from 9.4% to 8.6% but its ROUGE-1 from 29.7 to
21.6 (50 articles): the clipped extremes are the weights that matter.

Stored for a weight (out, in): weight (out, in/2) uint8, input features 2j (low nibble) and 2j+1 (high
nibble) in byte j; scale (out, in/g) in the float dtype and zero (out, in/g) uint8 — (out,) each per
channel. All follow the weight's dims, so a row-parallel rank holds its input features' bytes and groups
(a group must not straddle two ranks: g divides in / tp), and a per-channel scale is whole on every rank.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from . import GemvFusions, Stored, WeightOnlyMode, register, select_kernel
from .int8_wo import smallest_scale


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 levels in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack(q: torch.Tensor) -> torch.Tensor:
    """(out, in) levels in [0, 15] -> (out, in/2) uint8."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in dtype: (q - zero) is an exact integer, times the scale rounded once. The
    group size follows from the shapes: in / scale's columns (one column: per channel)."""
    q = unpack(packed)
    out, inp = q.shape
    s, z = scale.reshape(out, -1, 1), zero.reshape(out, -1, 1)  # (out, groups, 1)
    w = (q.reshape(out, s.shape[1], -1).to(torch.int16) - z.to(torch.int16)).to(dtype) * s.to(dtype)
    return w.reshape(out, inp)


class Int4WeightOnlyLinear(GemvFusions):
    """On CUDA, triton_wo.cuda_linear: the Triton GEMV at batch 1 (with PRMT; where PRMT does not run, bf16 takes
    tinygemm there too), torch's int4 tinygemm for batches 2-16 (bf16; its tiles of the weight are made here, at
    load, so GPU memory holds the int4 weight twice: 1 byte a weight, half of bf16's), the Triton kernel to batch
    64, then a one-pass dequantize + cuBLAS; $EF_WO_KERNEL=triton: the Triton kernel at every batch;
    $EF_WO_GLUON=1 (experimental): runtime/quant/gluon_int4.py for 5-8 rows in bf16 (groups of 128; its repacked
    weight made at load, a third copy in GPU memory), where it beat tinygemm on an H100 (a LLaMA-7B layer's
    linears at 8 rows: 96.4 us against 143.5; at 1 row it lost, 89.4 against 66.8, and tinygemm's 4 rows took
    89.8; 2026-12-07, tests/perf/gemv_probe.py --sections gluon,tinygemm). Elsewhere, or with
    $EF_WO_KERNEL=torch, the plain-torch reference (the oracle of the kernels): unpack, dequantize to the
    activation dtype, matmul.

    On CPU the weight is dequantized once, here, in the float dtype of its scales (the engine's activation
    dtype): unpacking every call cost 55 s an article of SmolLM2-135M summarize on 2 cores. It is the per-call arithmetic done early, so the products are bit-identical; an input of
    another dtype, and the CUDA fallback ($EF_WO_KERNEL=torch, where the point is to keep 4-bit bytes in
    memory), dequantize per call."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.weight = tensors["weight"]  # (out, in/2) uint8
        self.scale, self.zero = tensors["scale"].contiguous(), tensors["zero"].contiguous()  # (out, groups) | (out,)
        self.bias = tensors.get("bias")
        self.kernel = select_kernel(self.weight.device)
        self.init_fusions()
        self.dequantized = (dequantize(self.weight, self.scale, self.zero, self.scale.dtype)  # (out, in)
                            if self.weight.device.type == "cpu" else None)
        self.tiny = None  # torch's int4 tinygemm operands for small batches (runtime/quant/triton_wo.py)
        self.gluon = None  # $EF_WO_GLUON=1 (experimental): runtime/quant/gluon_int4.py for 5-8 rows in bf16
        if self.kernel == "cuda":
            from .triton_wo import tinygemm_operands

            self.tiny = tinygemm_operands(self.weight, self.scale, self.zero)
            if os.environ.get("EF_WO_GLUON") == "1":
                from . import gluon_int4

                self.gluon = gluon_int4.operands(self.weight, self.scale, self.zero)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def kernel_operands(self) -> tuple:
        return self.weight, self.scale, self.zero, 4, self.tiny

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gluon is not None and x.dtype == torch.bfloat16 and 4 * x.shape[-1] < x.numel() <= 8 * x.shape[-1]:
            from . import gluon_int4

            y = gluon_int4.linear(x, self.gluon)
            return y if self.bias is None else y + self.bias
        if self.kernel in ("triton", "cuda"):
            y = self.kernel_linear(x)
            return y if self.bias is None else y + self.bias
        w = self.dequantized
        if w is None or w.dtype != x.dtype:
            w = dequantize(self.weight, self.scale, self.zero, x.dtype)
        return F.linear(x, w, self.bias)


class Int4WeightOnly(WeightOnlyMode):
    def __init__(self, group_size: int | None):
        self.group_size = group_size  # None: per output channel
        self.name = "int4_wo" + (f"_g{group_size}" if group_size else "")
        # measured on tiny random models and SmolLM2-135M (README "Quantized precisions")
        self.bounds = (4e-1, 0.5) if group_size is None else (2.5e-1, 0.6)

    def _groups(self, inp: int) -> int:
        return inp // self.group_size if self.group_size else 1

    def stored(self, shape, dtype):
        out, inp = shape
        per = (out, self._groups(inp)) if self.group_size else (out,)
        dims = ("out", "in") if self.group_size else ("out",)
        return {"weight": Stored((out, inp // 2), torch.uint8, ("out", "in")),
                "scale": Stored(per, dtype, dims), "zero": Stored(per, torch.uint8, dims)}

    def partition_problem(self, shape, in_per_rank):
        inp, g = shape[1], self.group_size
        if g and (inp % g or in_per_rank % g):
            per_rank = f" ({in_per_rank} per rank)" if in_per_rank != inp else ""
            return f"in_features={inp}{per_rank} is not a multiple of the group size {g}"
        if in_per_rank % 2:
            return f"in_features per rank={in_per_rank} is odd: two int4 are packed per byte"
        return None

    def quantize(self, weight, dtype, stats=None):
        w = weight.float()
        out, inp = w.shape
        wg = w.reshape(out, self._groups(inp), -1)  # (out, groups, g)
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        exact = ((hi - lo) / 15).clamp(min=smallest_scale(dtype))
        scale = exact.to(dtype)
        # rounded up where the dtype rounded down, so that (max - min) / scale <= 15: every w within scale / 2
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        s = scale.float()
        zero = torch.round(-lo / s).clamp(0, 15)
        q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp(0, 15).reshape(out, inp)
        shape = (out,) if self.group_size is None else (out, self._groups(inp))
        return {"weight": pack(q), "scale": scale.reshape(shape), "zero": zero.to(torch.uint8).reshape(shape)}

    def kernel_copy_bytes(self, suffix, shape, stored_dtype, dtype):
        """In bf16 the CUDA linear also holds torch's tinygemm tiles of the packed weight: as many bytes again."""
        packed = suffix == "weight" and stored_dtype == torch.uint8  # a quantized linear's bytes (not a norm's)
        return math.prod(shape) if packed and dtype == torch.bfloat16 else 0

    def linear(self, tensors):
        return Int4WeightOnlyLinear(tensors)


for _g in (None, 128, 64, 32):
    register(Int4WeightOnly(_g))
