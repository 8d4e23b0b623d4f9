"""Family registry: HF `architectures` -> Family. Each family module registers itself."""
from __future__ import annotations

import importlib
import pkgutil

from runtime.errors import UserError

from .base import Family

FAMILIES: dict[str, Family] = {}  # by model_type
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    for arch in family.architectures:
        _BY_ARCH[arch] = family
    return family


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def resolve(hf_config: dict, family: str | None = None, where: str = "the source") -> Family:
    """The family named by the recipe (model.family), else by config.json's architectures."""
    _load_all()
    if family:
        if family not in FAMILIES:
            raise UserError(f"model.family={family} is not a known family; known: {', '.join(sorted(FAMILIES))}")
        return FAMILIES[family]
    for arch in hf_config.get("architectures") or []:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    mt = hf_config.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    raise UserError(f"{where}: architectures {hf_config.get('architectures')} (model_type {mt!r}) is not a "
                    f"supported family; supported: {', '.join(sorted(_BY_ARCH))}; or set model.family=")
