"""Hydra set-up: schemas, resolvers, recipes as the `recipe` group, and composition with one-line errors."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from runtime.errors import UserError

from .paths import conf_dir, recipe_names, recipes_dir, shared_dir
from .schema import register as register_schema

_done = False


def setup() -> None:
    """Register schemas, resolvers and recipes once per process."""
    global _done
    if _done:
        return
    from hydra.core.config_store import ConfigStore

    from .store import default_store

    register_schema()
    OmegaConf.register_new_resolver("ef.shared", lambda rel="": str(shared_dir() / rel), replace=True)
    OmegaConf.register_new_resolver("ef.default_store", default_store, replace=True)
    OmegaConf.register_new_resolver("ef.job_root", job_root, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("ef.pid", os.getpid, replace=True)
    from runtime.quant.sq import mode_name

    OmegaConf.register_new_resolver("ef.sq_mode", lambda per_token, per_channel: mode_name(bool(per_token),
                                                                                          bool(per_channel)), replace=True)
    cs = ConfigStore.instance()
    for name in recipe_names():
        cs.store(group="recipe", name=name, node=OmegaConf.load(recipes_dir() / f"{name}.yaml"),
                 package="_global_")
    _done = True


def job_root(store: str, kind: str) -> str:
    """Where Hydra keeps a run's or a sweep's logs: `<store>/<kind>`, or, when the store is read-only (a cache
    hit needs no writes), a folder in the system's temporary directory."""
    from .store import Store

    root = Store(store)
    if root.writable:
        return str(root.root / kind)
    return str(Path(tempfile.gettempdir()) / f"engine-factory-{os.getuid()}" / kind)


def _one_line(e: BaseException) -> str:
    parts = []
    while e is not None:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()
                        and not line.strip().startswith(("full_key", "object_type", "reference_type")))
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    msg = "; ".join(parts)
    msg = msg.split(" Config search path:")[0]  # Hydra's search path says nothing a user can act on
    m = re.search(r"Could not find '(\w+)/([^']+)' Available options in '\w+': (.*)", msg)
    if m:
        options = ", ".join(o for o in m.group(3).split() if o != "schema")
        return f"{m.group(1)}={m.group(2)}: no such option; available: {options} (files in conf/{m.group(1)}/)"
    m = re.search(r"Key '([^']+)' not in '(\w+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        msg += " (list the valid keys with `python -m engine_factory --cfg job`)"
    return msg


def _points(overrides: list[str]) -> list[list[str]]:
    """The override lists to check for a command line: every value of every sweep, once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise UserError(f"cannot parse the overrides: {_one_line(e)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [(o.get_key_element(), list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    for key, values in sweeps:
        if key.lstrip("+~") == "recipe":
            _check_recipes(values)
    for o in parsed:
        if o.key_or_group == "recipe" and not o.is_sweep_override():
            _check_recipes([o.value()])
    first = [f"{k}={v[0]}" for k, v in sweeps]
    points = [fixed + first]
    for i, (key, values) in enumerate(sweeps):
        for v in values[1:]:
            points.append(fixed + first[:i] + [f"{key}={v}"] + first[i + 1:])
    return points


def _check_recipes(values) -> None:
    known = recipe_names()
    for v in values:
        if v not in known:
            raise UserError(f"recipe={v}: no such recipe; published recipes: {', '.join(known)} "
                            f"(files in {recipes_dir()})")


def compose(overrides: list[str]):
    """The resolved config of one override list (as a run would see it), or a one-line UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    setup()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
        OmegaConf.resolve(cfg)
        return cfg
    except UserError:
        raise
    except Exception as e:  # hydra/omegaconf raise many types; all are config mistakes here
        raise UserError(f"config: {_one_line(e)}") from None


def precheck(overrides: list[str]) -> None:
    """Compose every point of the command line and check it (config, and the model's shape where the source's
    config can be read without fetching), before Hydra starts any job or creates any folder."""
    from .pipeline import check_before_work

    _check_hydra_paths(overrides)
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    for point in _points(user):
        check_before_work(compose(point))


def _check_hydra_paths(overrides: list[str]) -> None:
    """Hydra's folders are the user's to move (like store=), but a sweep's job folder is a name, and no path
    climbs out of where it points with '..'."""
    from .store import check_name

    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "hydra.sweep.subdir" and "${" not in value:
            check_name(key, value)
        elif key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir") and ".." in Path(value).parts:
            raise UserError(f"{key}={value}: no '..' in Hydra's folders; give a path without it")
