"""KV-cache formats, by name (engine.json's quant.kv_cache, the build's precision.kv_cache).

A format says what the static cache stores per element and how a float K or V becomes that:
  auto   the activation dtype (fp32 / fp16 / bf16): no scales, the bytes the decoder always wrote
  int8   int8, symmetric: q = clamp(round(x / s), -127, 127), x ~ q * s
  fp8    float8 E4M3 (torch.float8_e4m3fn): q = e4m3(clamp(x / s, -448, 448)), x ~ q * s
Scaled formats have one fp32 scale for K and one for V per layer, s = calibrated abs-max / qmax
(engine_factory/stages/calibrate.py), stored in the rank file as `layers.{i}.kv_cache.scale` = [s_k, s_v]
(replicated on every tp rank: the scale is per layer, not per head). fp8 takes calibrated scales too
rather than 1.0: K of real models reaches tens, where E4M3's steps are 2-4 wide, and small V would sit
in its subnormals. Values past the calibrated range saturate (clamp), they never overflow.

The attention entries (runtime/attention.py) read the cache as stored: the torch reference
dequantizes it (`dequantize`), the Triton kernel loads int8 / fp8 and multiplies by the scales in
registers. A new format is a new entry here; the decoder and the kernels never branch on its name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_NAME = "layers.{i}.kv_cache.scale"  # (2,) float32: K scale, V scale of layer i


@dataclass(frozen=True)
class KVFormat:
    name: str
    storage: torch.dtype | None  # what the cache holds; None: the activation dtype
    qmax: float | None = None  # the largest stored magnitude; None: not quantized (no scales)
    round: bool = False  # round to the nearest integer before the cast (int8; fp8's cast rounds itself)

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    def storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.storage or dtype

    def bytes_per_element(self, dtype: torch.dtype) -> int:
        return self.storage_dtype(dtype).itemsize

    def scales(self, k_absmax: float, v_absmax: float) -> torch.Tensor:
        """[s_k, s_v] (2,) float32 from calibrated abs-maxima; never 0 (an all-zero K maps to 0 anyway)."""
        amax = torch.tensor([k_absmax, v_absmax], dtype=torch.float32)
        return (amax / self.qmax).clamp(min=torch.finfo(torch.float32).tiny)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """x (any shape, float) -> what the cache of dtype `dtype` stores; scale a 0-d fp32 tensor."""
        if not self.scaled:
            return x.to(dtype)
        y = x.float() / scale
        if self.round:
            y = y.round()
        return y.clamp(-self.qmax, self.qmax).to(dtype)


KV_FORMATS: dict[str, KVFormat] = {
    "auto": KVFormat("auto", None),
    "int8": KVFormat("int8", torch.int8, qmax=127.0, round=True),
    "fp8": KVFormat("fp8", torch.float8_e4m3fn, qmax=448.0),
}


def kv_format(name: str) -> KVFormat:
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise ValueError(f"KV-cache format {name!r} is unknown; known: {', '.join(KV_FORMATS)}") from None


def dequantize(cache: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored int8 / fp8 cache (any shape) times its 0-d scale, in `dtype` (computed in fp32)."""
    return (cache.to(torch.float32) * scale).to(dtype)
