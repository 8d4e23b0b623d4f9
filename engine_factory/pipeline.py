"""fetch -> convert -> calibrate -> build -> validate, into the content-addressed store."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from runtime.dtypes import torch_name
from runtime.errors import EngineError, UserError
from runtime.format import FORMAT_VERSION, VALIDATION_JSON, verify_engine
from runtime.quant import get as quant_mode

from . import __version__, families
from .checks import check_config, check_model
from .hashing import digest
from .plan import check_fits, describe, engine_limits, engine_spec, mapping_of, plan
from .sources import peek_config
from .stages.build import build, quant_settings
from .stages.calibrate import calibration
from .stages.convert import CONVERT_VERSION, convert
from .stages.fetch import fetch
from .stages.validate import ValidationFailed, validate, validate_key
from .store import Store, check_name, is_complete_engine, no_space, safe_name
from .tokenizers import tokenizer_saver

log = logging.getLogger(__name__)


def engine_identity(cfg, source, spec, calib=None) -> dict:
    """Everything that changes the engine's bytes, and nothing else (no paths, no validate). calib: the
    build's calibration (stages/calibrate.py), None for precisions that calibrate nothing."""
    return {
        "format_version": FORMAT_VERSION, "convert_version": CONVERT_VERSION, "backend": cfg.backend,
        "target": cfg.target, "source": source.digest, "spec": spec.to_dict(),
        "dtype": cfg.precision.dtype, "quant": cfg.precision.quant, "kv_cache": cfg.precision.kv_cache,
        **({"quant_lm_head": True} if cfg.precision.quant_lm_head else {}),  # (no key when off: older engines' hashes)
        "calibration": None if calib is None else calib.identity,  # statistics' digest + settings, no path
        **({"quant_settings": qs} if (qs := quant_settings(cfg)) else {}),  # the mode's own (SmoothQuant's alpha, ...)
        # the version of the mode's quantize(): a change of its bytes is a new engine (float engines: no key)
        **({"quant_version": m.version} if (m := quant_mode(cfg.precision.quant)).quantizes else {}),
        "parallel": {k: v for k, v in OmegaConf.to_container(cfg.parallel, resolve=True).items()
                     if k != "build_workers"}, "limits": engine_limits(cfg, spec),
        "plugins": OmegaConf.to_container(cfg.plugins, resolve=True),
    }


def _toolchain() -> dict:
    import safetensors
    import torch
    import transformers

    return {"engine_factory": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


def _spec(cfg, hf_config: dict, tokenizer_config: dict | None = None):
    family = families.resolve(hf_config, cfg.model.family, where=f"model.source={cfg.model.source}")
    try:
        spec = family.spec(hf_config, cfg.model.version)
    except KeyError as e:
        raise UserError(f"model.source={cfg.model.source}: config.json lacks {e} that a {family.model_type} "
                        "model needs") from None
    if tokenizer_config and "add_bos_token" in tokenizer_config:
        spec = dataclasses.replace(spec, add_bos_token=bool(tokenizer_config["add_bos_token"]))
    return family, spec


def check_before_work(cfg):
    """Every check that needs no more than the source's config (config.json, a GGUF header, model.config):
    what a sweep runs for all of its points before the first one builds. Returns the model spec, or None for
    sources that only fetching can read, which are checked once fetched."""
    check_config(cfg)
    spec = peek_spec(cfg)
    if spec is not None:
        check_model(cfg, spec)
        if not cfg.plan:
            check_fits(cfg, spec)
    return spec


def peek_spec(cfg):
    """The model spec from the source's config alone, or None where only fetching can read it."""
    if OmegaConf.is_missing(cfg.model, "source") or not cfg.model.source:
        return None  # fetch says what to pass
    hf_config = peek_config(str(cfg.model.source), cfg.model)
    if hf_config is None:
        return None
    if cfg.model.config:
        hf_config = {**hf_config, **OmegaConf.to_container(cfg.model.config, resolve=True)}
    return _spec(cfg, hf_config)[1]


def print_plan(cfg) -> None:
    """`plan=true`: the memory plan per rank, from the model's config alone; nothing fetched or built."""
    spec = check_before_work(cfg)
    if spec is None:
        raise UserError(f"plan=true: model.source={cfg.model.source} gives its config only when fetched; pass a "
                        "local folder, a .gguf file or dummy with model.config")
    for line in describe(cfg, plan(cfg, spec)):
        print(line, flush=True)


def run(cfg, recipe: str | None = None) -> Path:
    """Build (or find) the engine of a resolved config; returns its folder."""
    t0 = time.perf_counter()
    check_config(cfg)
    store = Store(cfg.store)
    source = fetch(cfg.model, store)
    family, spec = _spec(cfg, source.hf_config, source.tokenizer_config)
    check_model(cfg, spec)
    check_fits(cfg, spec)
    calib = calibration(cfg, source, family, spec, store)  # cached; None for precisions that need none
    espec = engine_spec(cfg, spec)  # what the engine stores (a tied model with a quantized lm_head: untied)
    identity = engine_identity(cfg, source, espec, calib)
    h = digest(identity)
    name = cfg.model.name or (check_name("recipe", recipe) if recipe else safe_name(source.name))
    engine_dir = store.engine_dir(name, h)
    if is_complete_engine(engine_dir) and not cfg.force:
        damage = _damage(engine_dir, cfg.verify)
        if damage is None:
            log.info("cache hit: %s", engine_dir)
            _revalidate_if_needed(engine_dir, source, cfg, store, h, spec)
            return engine_dir
        log.warning("the engine in the store is damaged, rebuilding it: %s", damage)
    needed = sum(r["weight_bytes"] for r in plan(cfg, spec)["ranks"])  # the rank files, from shapes alone
    store.prepare(f"building {engine_dir.name}")
    store.remove_stale_staging()
    free = shutil.disk_usage(store.root).free
    if free < needed:
        raise no_space(store.root, needed)
    with store.lock(h):
        if is_complete_engine(engine_dir) and not cfg.force and _damage(engine_dir, cfg.verify) is None:
            return engine_dir  # another process built it while this one waited for the lock
        tensors = convert(source, family, spec, store)
        engine_json = {
            "format_version": FORMAT_VERSION, "name": name, "hash": h, "recipe": recipe,
            "config": OmegaConf.to_container(cfg, resolve=True), "spec": espec.to_dict(),
            "dtype": torch_name(cfg.precision.dtype),
            "quant": {"mode": cfg.precision.quant, "kv_cache": cfg.precision.kv_cache,
                      **({"lm_head": True} if cfg.precision.quant_lm_head else {}),
                      **({"settings": qs} if (qs := quant_settings(cfg)) else {})},
            "mapping": mapping_of(cfg),
            "limits": identity["limits"], "source": source.provenance, "family": family.model_type,
            "toolchain": _toolchain(), "target": {"device": cfg.target, "sm": None}, "backend": cfg.backend,
            "runtime": {"cuda_graphs": cfg.plugins.cuda_graphs, "remove_padding": cfg.plugins.remove_padding},
        }
        with store.staging(engine_dir, needed) as tmp:
            build(tmp, tensors, espec, cfg, engine_json, tokenizer_saver(source, family, cfg), calib)
            if cfg.validate.enabled:
                try:
                    validate(tmp, source, cfg, engine_dir.name, spec)
                except ValidationFailed as e:  # the staging folder goes: name the engine and the kept report
                    report = _keep_failed_report(store, tmp, engine_dir.name)
                    raise ValidationFailed(f"validation of {engine_dir.name} failed: {'; '.join(e.failures)} "
                                           f"(report: {report}); loosen validate.* bounds only if this is "
                                           "expected", e.failures) from None
    log.info("built %s in %.1fs", engine_dir, time.perf_counter() - t0)
    return engine_dir


def _damage(engine_dir: Path, mode: str) -> str | None:
    """None for an intact engine (sizes, or sha256 with mode=full), else what is wrong with it."""
    try:
        verify_engine(engine_dir, mode)
    except EngineError as e:
        return str(e)
    return None


def _revalidate_if_needed(engine_dir: Path, source, cfg, store: Store, key: str, spec) -> None:
    import json

    if not cfg.validate.enabled:
        return
    path = engine_dir / VALIDATION_JSON
    try:
        if json.loads(path.read_text()).get("validate_key") == validate_key(cfg):
            return
    except (OSError, ValueError):
        pass
    if not store.writable:
        log.warning("validate: %s has no validation for these validate.* settings, and the store is read-only: "
                    "not validated again", engine_dir.name)
        return
    store.prepare(f"validating {engine_dir.name}")
    with store.lock(key):  # the build's lock: not while a rebuild of this engine replaces its folder
        validate(engine_dir, source, cfg, spec=spec)


def _keep_failed_report(store: Store, tmp: Path, name: str) -> Path | None:
    if (tmp / VALIDATION_JSON).is_file():
        dest = store.root / "failed"
        dest.mkdir(exist_ok=True)
        shutil.copy(tmp / VALIDATION_JSON, dest / f"{name}.validation.json")
        return dest / f"{name}.validation.json"
    return None
