"""The float dtypes of engines, in one table: the config's short names (precision.dtype) and torch's dtypes;
engine.json records torch's name of it (torch_name)."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_name(short: str) -> str:
    """"fp16" -> "float16", as engine.json's dtype says it."""
    return str(DTYPES[short]).removeprefix("torch.")


# safetensors' dtype names (its header's "dtype"), for writing headers and checking them without reading data
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}
