"""A recipe's `expect.validation` bounds, {dotted path: {min | max | eq: value}}, against validation.json: the one
table of operators, for the validate stage (a build fails on a missed bound) and `engines --reproduce` (a
rebuild's checks)."""
from __future__ import annotations

BOUNDS = {"min": lambda v, b: v >= b, "max": lambda v, b: v <= b, "eq": lambda v, b: v == b}


def lookup(data: dict, dotted: str):
    """validation.json's value at a dotted path ("parity.max_rel_logits", "task.engine.rouge1"), or None."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def evaluate(validation: dict, bounds: dict) -> list[tuple[str, str, object, object, bool]]:
    """(path, op, value, limit, met) for every bound; a missing value meets none."""
    out = []
    for path, bound in bounds.items():
        value = lookup(validation, path)
        out += [(path, op, value, limit, value is not None and BOUNDS[op](value, limit)) for op, limit in bound.items()]
    return out


def check_bounds(validation: dict, bounds: dict) -> list[str]:
    """The bounds validation.json misses, one line each."""
    return [f"{path} = {value} (expect {op} {limit})" for path, op, value, limit, met in evaluate(validation, bounds)
            if not met]
