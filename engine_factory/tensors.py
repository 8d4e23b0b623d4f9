"""TensorSource: canonical tensors by name, loaded one at a time (the converted checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "index.json"


class ShardedCheckpoint:
    """A converted checkpoint: shard-NNNNN.safetensors files and index.json (written last)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.index = json.loads((folder / INDEX).read_text())["tensors"]
        self._handles = {f: safe_open(str(folder / f), framework="pt")
                         for f in sorted({e["file"] for e in self.index.values()})}

    def keys(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.index[name]["file"]].get_tensor(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Elements start:stop of dim, read from the file alone (a rank's part of a tensor)."""
        sl = self._handles[self.index[name]["file"]].get_slice(name)
        return sl[(slice(None),) * dim + (slice(start, stop),)]
