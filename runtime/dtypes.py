"""The float dtypes of engines, in one table: the config's short names (precision.dtype) and torch's dtypes;
engine.json records torch's name of it (torch_name)."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_name(short: str) -> str:
    """"fp16" -> "float16", as engine.json's dtype says it."""
    return str(DTYPES[short]).removeprefix("torch.")
