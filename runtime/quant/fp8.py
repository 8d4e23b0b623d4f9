"""fp8: FP8 E4M3 weights and activations, one fp32 scale per tensor each; torch._scaled_mm on GPUs with FP8
tensor cores (compute capability >= 8.9: L4, L40S, H100, H200, B200), a plain-torch reference elsewhere.

Stored for a weight (out, in): weight (out, in) float8_e4m3fn with w ~ q * weight_scale, weight_scale =
max|w| / 448 over the world-1 weight (quantized before sharding, like int8_wo: every tp stores tp1's
numbers); input_scale = the calibrated abs-max of the linear's input / 448 (calibrate's `input_absmax`).
Both scales are (1,) fp32, follow no dim of the weight, and so are whole on every rank.

The activation scale is static (calibrated), not computed from each input: a row-parallel rank sees only
its slice of the input, whose abs-max is not tp1's, so a dynamic per-tensor scale would round differently
at every tp; a static one gives each rank tp1's numbers, does not make one sequence's rounding depend on
the others in its batch, and costs no abs-max reduction per linear. Inputs past the calibrated range
saturate at +-448 steps (clamped, never inf).

On CUDA ($EF_WO_KERNEL=auto) up to triton_w8a8.SMALL_M rows (decode) the Triton E4M3 GEMM with the scale
epilogue (runtime/quant/triton_w8a8.py), above (prefill) torch._scaled_mm; $EF_WO_KERNEL=triton: the Triton
GEMM at every size. The CPU path (and $EF_WO_KERNEL=torch on CUDA) is the oracle of the kernels:
(x_q * sx) @ (w_q * sw)^T in fp32, the weight dequantized once at load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EngineError
from . import QuantMode, Stored, register, select_kernel

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
MIN_SM = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
_TINY = torch.finfo(torch.float32).tiny


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to the nearest E4M3 value, saturated at +-448 (the cast alone would give NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def require_fp8(device: torch.device) -> None:
    """One line unless `device` runs the fp8 linear: the CPU runs the reference; a GPU needs sm >= 89."""
    if device.type != "cuda":
        return
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < MIN_SM:
        raise EngineError(f"precision fp8 needs a GPU with FP8 (compute capability >= 8.9: L4, L40S, H100, H200); "
                          f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: run this engine with "
                          "device=cpu, or build precision=int8_wo for this GPU")


def _round16(n: int) -> int:
    return -(-n // 16) * 16


class FP8Linear:
    """y = (x_q W_q^T) * sx * sw + b in the activation dtype."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.weight = tensors["weight"]  # (out, in) e4m3
        self.weight_scale = tensors["weight_scale"].float().reshape(())
        self.input_scale = tensors["input_scale"].float().reshape(())
        self.bias = tensors.get("bias")
        require_fp8(self.weight.device)
        # CPU: torch (the reference); CUDA: cuda (Triton for decode, _scaled_mm above), triton, or torch
        self.kernel = select_kernel(self.weight.device)
        out, inp = self.weight.shape
        if self.kernel == "cuda":
            # _scaled_mm: A (M, K) row-major, B (K, N) column-major, K and N multiples of 16: zero rows and
            # columns added once here (a zero column of W meets the zero padding of x)
            self.pad_k, self.pad_n = _round16(inp) - inp, _round16(out) - out
            w = self.weight
            if self.pad_k or self.pad_n:
                w = torch.zeros((out + self.pad_n, inp + self.pad_k), dtype=E4M3, device=w.device)
                w[:out, :inp] = self.weight
            self.w_t = w.t()  # (K, N), strides (1, K): column-major
        elif self.kernel == "torch":
            self.w_ref = self.weight.float() * self.weight_scale  # (out, in) fp32, the dequantized weight

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, inp = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, inp)  # (M, in)
        small = False
        if self.kernel in ("cuda", "triton"):
            from . import triton_w8a8

            small = self.kernel == "triton" or x2.shape[0] <= triton_w8a8.SMALL_M
        if small:
            y = triton_w8a8.w8a8_linear(to_e4m3(x2, self.input_scale), self.weight, self.input_scale,
                                        self.weight_scale, x.dtype)
        elif self.kernel == "cuda":
            if self.pad_k:
                x2 = F.pad(x2, (0, self.pad_k))
            y = torch._scaled_mm(to_e4m3(x2, self.input_scale), self.w_t, scale_a=self.input_scale,
                                 scale_b=self.weight_scale, out_dtype=x.dtype)
            if self.pad_n:
                y = y[:, :self.out_features]
        else:
            y = ((to_e4m3(x2, self.input_scale).float() * self.input_scale) @ self.w_ref.t()).to(x.dtype)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class FP8(QuantMode):
    name = "fp8"
    needs_calibration = True  # the static activation scale: calibrate's input_absmax of each linear
    min_sm = 89  # engine_factory/checks.py refuses a target_gpu below it before any work
    # measured against transformers fp32 (bf16 engines) on tests/tiny_families.py: llama 0.229 / 0.75, gpt2
    # 0.092 / 0.77, bloom 0.116 / 0.97, gpt_bigcode 0.168 / 0.82 (int8_wo 0.042 / 0.93 at most): E4M3 keeps 3
    # mantissa bits, ~2.5% RMS per weight where int8 per channel keeps ~0.6% on Gaussian rows
    bounds = (3e-1, 0.65)

    def stored(self, shape, dtype):
        out, inp = shape
        return {"weight": Stored((out, inp), E4M3, ("out", "in")),
                "weight_scale": Stored((1,), torch.float32, ()), "input_scale": Stored((1,), torch.float32, ())}

    def quantize(self, weight, dtype, stats=None):
        if stats is None or "input_absmax" not in stats:
            raise ValueError("fp8 quantizes a linear with its calibration statistics (input_absmax): none given")
        w = weight.float()
        sw = (w.abs().max() / E4M3_MAX).clamp(min=_TINY)
        sx = (stats["input_absmax"].float().max() / E4M3_MAX).clamp(min=_TINY)
        return {"weight": to_e4m3(w, sw), "weight_scale": sw.reshape(1), "input_scale": sx.reshape(1)}

    def linear(self, tensors):
        return FP8Linear(tensors)


register(FP8())
