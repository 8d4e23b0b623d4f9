"""Where conf/ and recipes/ are (package data in a wheel, the repo root in a checkout), and ../shared."""
from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for cand in (_PKG / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"engine_factory: {name}/ not found next to {_PKG}")


def conf_dir() -> Path:
    return _data_dir("conf")


def recipes_dir() -> Path:
    """EF_RECIPES_DIR (another set of published recipes, e.g. a test's edited copies), else the package's."""
    if os.environ.get("EF_RECIPES_DIR"):
        return Path(os.environ["EF_RECIPES_DIR"]).expanduser().resolve()
    return _data_dir("recipes")


def shared_dir() -> Path:
    """EF_SHARED_DIR, else ../shared beside the checkout (or the current directory)."""
    if os.environ.get("EF_SHARED_DIR"):
        return Path(os.environ["EF_SHARED_DIR"]).expanduser().resolve()
    for base in (_PKG.parent, Path.cwd()):
        cand = base.parent / "shared"
        if cand.is_dir():
            return cand.resolve()
    return (Path.cwd().parent / "shared").resolve()


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))
