"""calibrate: activation statistics for quantization. No float precision needs it: a no-op until
the quantization modes that do (SmoothQuant, INT8 KV cache) are added."""
from __future__ import annotations

NEEDS_CALIBRATION: set[str] = set()  # quant modes that read calibration statistics


def calibrate(cfg, tensors, spec, store):
    if cfg.precision.quant not in NEEDS_CALIBRATION:
        return None
    raise NotImplementedError(cfg.precision.quant)  # unreachable: checks refuse such modes first
