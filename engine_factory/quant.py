"""Weight quantization at build time: a registry of modes, each turning one linear weight (out, in) into
the tensors its runtime linear (runtime/linear.py, same mode name) reads. Embeddings, norms, biases and
the lm_head stay in the float dtype."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Quantizer:
    # (out, in), float dtype -> {suffix: (shape, dtype)} of the stored tensors (planned before any work)
    shapes: Callable[[tuple[int, int], torch.dtype], dict[str, tuple[tuple[int, ...], torch.dtype]]]
    # (weight in fp32, float dtype) -> {suffix: tensor}
    quantize: Callable[[torch.Tensor, torch.dtype], dict[str, torch.Tensor]]
    bits: int  # per weight, for size estimates


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(mode: str, q: Quantizer) -> Quantizer:
    QUANTIZERS[mode] = q
    return q


def _int8_per_channel(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Symmetric, one scale per output channel: w ≈ q * scale, q in [-127, 127]. The scale is rounded to
    the float dtype first, so the runtime's dequantization uses exactly the scale q was made with."""
    w = w.float()
    smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal: a scale never 0
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=smallest).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "scale": scale}


register_quantizer("int8_wo", Quantizer(
    shapes=lambda shape, dtype: {"weight": (shape, torch.int8), "scale": ((shape[0],), dtype)},
    quantize=_int8_per_channel, bits=8))
