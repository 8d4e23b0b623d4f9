"""A streaming safetensors writer: the header is planned from shapes, then tensors are produced and
written one at a time, so a rank file of any size needs one tensor in memory. Names are sorted and
the header has no timestamps, so the same tensors always give the same bytes."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from runtime.dtypes import SAFETENSORS_DTYPES as _DTYPES



def write_streaming(path: Path, plan: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                    metadata: dict[str, str] | None = None, progress=None) -> None:
    """plan: name -> (shape, dtype, produce). Each produced tensor must have that shape and dtype."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(plan)
    for name in names:
        shape, dtype, _ = plan[name]
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            shape, dtype, produce = plan[name]
            t = produce()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            t = t.contiguous().cpu()
            # bytes through a uint8 view (numpy has no bfloat16), written from the tensor's memory (no copy)
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(1)
