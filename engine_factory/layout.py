"""Canonical checkpoint layout (what convert writes) and the runtime layout of a rank file."""
from __future__ import annotations

from runtime.rank_files import world_shapes
from runtime.spec import ModelSpec


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a converted checkpoint of `spec` holds: unfused q/k/v and gate/up, (out, in)."""
    return world_shapes(spec, fused=False)


def is_norm(name: str) -> bool:
    return "norm." in name
