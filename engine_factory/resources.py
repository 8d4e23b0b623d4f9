"""How much memory this machine has free, and how much a model needs: sizes decided before any work."""
from __future__ import annotations

import math
import os
from pathlib import Path

from runtime.spec import ModelSpec

from .layout import canonical_shapes


def parameter_count(spec: ModelSpec, linear_only: bool = False) -> int:
    """All parameters, or those of the decoder layers' linear weights (what weight-only quantization stores)."""
    return sum(math.prod(s) for n, s in canonical_shapes(spec).items()
               if not linear_only or (n.startswith("layers.") and len(s) == 2))


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available(device) -> int | None:
    """Free bytes on a torch device ("cpu", "cuda", "cuda:1"), or None when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram() if device.type == "cpu" else None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
