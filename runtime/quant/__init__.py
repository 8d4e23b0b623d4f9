"""Quantization modes: one file per mode holds both halves, registered by name (engine.json's quant mode).

A mode says what a linear's (out, in) weight is stored as (each tensor's suffix, shape, dtype, and which
of the weight's dims it is cut along when the weight is sharded: runtime/shard.py), whether a partition
of the weight suits it (a group must not straddle two ranks), `quantize` at build time (the build in
engine_factory imports this package; runtime/ never imports the build), the runtime linear that reads
the stored tensors, whether it needs calibration statistics and its default validation bounds. Like
mlc-llm's GroupQuantize + GroupQuantizeLinear and gpt-fast's QuantHandler.

Embeddings, norms and biases stay in the float dtype: the four linears of a layer (attn.qkv, attn.o, mlp.up,
mlp.down) are a mode's, and the lm_head where a mode can take it (`lm_head`: the weight-only modes) and the
build asks (precision.quant_lm_head: gpt-fast's int8 and int4, vLLM's lm_head_quantized); the float one otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Stored:
    """One tensor a mode stores for a weight: world-1 shape, dtype, and per dim the weight's dim it
    follows ("out" or "in"): sharding the weight along that dim cuts this tensor the same way; a tensor
    without the dim a style splits (a per-output-channel scale of a row-parallel weight) is whole on
    every rank."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    follows: tuple[str, ...]


class QuantMode:
    name = ""
    quantizes = True  # False: the weight is stored in the float dtype as it is (the dense mode)
    needs_calibration = False  # quantize() reads calibration statistics
    bounds: tuple[float, float] | None = None  # validate's (max_rel_logits, min_token_agreement); None: the dtype's
    settings_keys: tuple[str, ...] = ()  # the precision.* settings the build passes to prepare() (hashed)
    version = 1  # in the engine's hash: bump it when quantize() / prepare() would write other bytes
    lm_head = False  # it can quantize the lm_head too (precision.quant_lm_head): needs no statistics of its input

    def stored(self, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, Stored]:
        """suffix -> what is stored for a world-1 weight of shape (out, in) and float dtype."""
        raise NotImplementedError

    def partition_problem(self, shape: tuple[int, int], in_per_rank: int) -> str | None:
        """Why this mode cannot store a weight of world-1 shape (out, in) whose ranks each hold
        in_per_rank input features (in / tp for row-parallel weights, in otherwise), or None."""
        return None

    def check(self, settings: dict, spec=None) -> str | None:
        """What is wrong with these settings (settings_keys -> value) for this model (spec; None: what the
        config alone says), or None."""
        return None

    def prepare(self, sources: dict, spec, stats, settings: dict | None):
        """The seam before quantize and shard: the world-1 runtime tensors (name -> a Sliceable with .shape,
        .narrow and .whole()) and calibration statistics -> the ones to quantize and shard. A mode may
        rewrite a layer's tensors here (SmoothQuant folds its smoothing into the norms and weights); every
        rank sees the same world-1 numbers. Default: as they are."""
        return sources, stats

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype, stats=None) -> dict[str, torch.Tensor]:
        """The world-1 weight (out, in) -> {suffix: tensor} (shapes as stored()); stats: calibration
        statistics of this linear's input when needs_calibration."""
        raise NotImplementedError

    def linear(self, tensors: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The runtime linear of one rank: tensors by suffix (its shard of each stored tensor; "bias"
        when the linear adds its own), called like F.linear(x, W, b)."""
        raise NotImplementedError

    def kernel_copy_bytes(self, suffix: str, shape: tuple[int, ...], stored_dtype: torch.dtype,
                          dtype: torch.dtype) -> int:
        """GPU bytes the CUDA linear holds beside a stored tensor (suffix, shape, dtype as stored; float dtype
        dtype), e.g. a library kernel's own layout of the weight made at load. Default: none."""
        return 0

    def call_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """GPU bytes the CUDA linear of a rank's (out, in) weight may allocate for one call besides its output (a
        copy of the weight dequantized whole, for calls of many rows), with activations in dtype. Default: none."""
        return 0

    def bytes_per_weight(self, dtype: torch.dtype, shape: tuple[int, int] = (4096, 4096)) -> float:
        """Stored bytes per weight element (scales included), for size estimates."""
        return sum(math.prod(s.shape) * s.dtype.itemsize for s in self.stored(shape, dtype).values()) / math.prod(shape)


MODES: dict[str, QuantMode] = {}


def register(mode: QuantMode) -> QuantMode:
    MODES[mode.name] = mode
    return mode


def get(name: str) -> QuantMode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"no quant mode {name!r}; known: {', '.join(sorted(MODES))}") from None


KERNELS = ("auto", "torch", "triton", "cuda")


class WeightOnlyMode(QuantMode):
    """A weight-only mode (int8_wo.py, int4_wo.py): activations stay float, so it can take the lm_head too, and its
    CUDA linear (triton_wo.cuda_linear) dequantizes the weight whole above triton_wo.DEQUANT_ABOVE rows (prefill,
    all-logits scoring)."""
    lm_head = True

    def call_bytes(self, shape, dtype):
        return math.prod(shape) * dtype.itemsize


def select_kernel(device: torch.device) -> str:
    """The weight-only GEMM of a quantized linear: $EF_WO_KERNEL (auto | torch | triton | cuda); auto is
    cuda on a CUDA device when triton is installed (triton_wo.cuda_linear: per batch size the fastest of
    torch's int4 tinygemm, the Triton kernel and dequantize + cuBLAS), plain torch elsewhere; triton: the
    Triton kernel (runtime/quant/triton_wo.py) at every batch size."""
    import importlib.util
    import os

    from ..errors import UserError

    name = os.environ.get("EF_WO_KERNEL", "auto")
    if name not in KERNELS:
        raise UserError(f"EF_WO_KERNEL={name} is unknown; use one of {', '.join(KERNELS)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name in ("triton", "cuda") and (device.type != "cuda" or not has_triton):
        raise UserError(f"EF_WO_KERNEL={name} cannot run here: {'not a CUDA device' if device.type != 'cuda' else 'triton is not installed'}"
                        "; use EF_WO_KERNEL=torch")
    if name == "auto":
        name = "cuda" if device.type == "cuda" and has_triton else "torch"
    return name


class GemvFusions:
    """The CUDA side of the weight-only linears (int8_wo.py, int4_wo.py): kernel_linear(), their product by the
    Triton / tinygemm kernels; and fused(), the norm before them, the gated activation before them or the residual
    after them in their CUDA kernel (triton_wo.fused_linear), where it serves x. fuses: whether to ask (a CUDA
    kernel and $EF_WO_FUSE=1 when the linear was made); runtime/model.py asks only then, so that the default decode
    step traces the plain ops alone."""

    fuses = False

    def init_fusions(self) -> None:
        """Set fuses (after self.kernel)."""
        if getattr(self, "kernel", None) == "cuda":
            from . import triton_wo

            self.fuses = triton_wo.FUSE

    def kernel_operands(self) -> tuple:
        """(weight, scale, zero, bits, tinygemm operands) as triton_wo.cuda_linear takes them."""
        raise NotImplementedError

    def kernel_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) without the bias, by self.kernel: "cuda" (triton_wo.cuda_linear: the fastest path
        for the batch) or "triton" (the Triton kernel at every batch)."""
        from . import triton_wo

        weight, scale, zero, bits, tiny = self.kernel_operands()
        if self.kernel == "cuda":
            return triton_wo.cuda_linear(x, weight, scale, zero, bits, tiny)
        return triton_wo.weight_only_linear(x, weight, scale, zero, bits, triton_wo.PRMT)

    def fused(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, act: str | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """self(RMSNorm of x with weight norm); or self(act(gate) * up) of x = [gate | up], residual added or not; or
        residual + self(x): in one kernel, or None where there is none for x (runtime/model.py then runs the plain
        ops)."""
        if not self.fuses or getattr(self, "bias", None) is not None or act not in (None, "silu"):
            return None
        from . import triton_wo

        return triton_wo.fused_linear(x, *self.kernel_operands(), norm=norm, eps=eps, gate=act is not None,
                                      residual=residual)


def make_linear(mode: str, tensors: dict[str, torch.Tensor], prefix: str):
    """The runtime linear stored under `prefix` in a rank's tensors."""
    return get(mode).linear({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


from . import dense, fp8, int4_wo, int8_wo, sq  # noqa: E402,F401  (each registers its modes)
