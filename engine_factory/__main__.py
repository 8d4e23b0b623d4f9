"""python -m engine_factory [recipe=NAME] [group=option ...] [key=value ...] [-m for sweeps]

Composes the config (conf/ + recipes/), checks it, and runs fetch -> convert -> calibrate -> build ->
validate. The last line printed is `engine: <path>`.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from runtime.cli import user_errors_exit
from runtime.errors import UserError

from . import config

log = logging.getLogger("engine_factory")

# Hydra flags that take a value; everything else not starting with "-" is an override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_failures: list[str] = []


def _overrides(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in _VALUE_FLAGS and a not in ("--info", "-i")
            continue
        out.append(a)
    return out


def _job(cfg) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    from . import pipeline

    logging.getLogger().setLevel(cfg.log_level.upper())
    hc = HydraConfig.get()
    recipe = hc.runtime.choices.get("recipe")
    t0 = time.perf_counter()
    if cfg.plan:
        try:
            pipeline.print_plan(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return None
    try:
        engine_dir = pipeline.run(cfg, recipe=recipe)
    except Exception as e:
        _record(hc, recipe, None, e, t0)
        if not isinstance(e, UserError):
            raise
        if hc.mode.name == "MULTIRUN":  # keep sweeping; report at the end
            log.error("%s", e)
            _failures.append(f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {e}")
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _record(hc, recipe, engine_dir, None, t0)
    print(f"engine: {engine_dir}", flush=True)
    return str(engine_dir)


def _record(hc, recipe, engine_dir, error, t0: float) -> None:
    """job.json in the job's output folder: what `python -m engine_factory.report` reads, with a copy of the
    engine's validation.json as this job saw it."""
    from runtime.format import VALIDATION_JSON

    from .report import JOB_JSON
    from .store import write_json_atomic

    val = Path(engine_dir) / VALIDATION_JSON if engine_dir else None

    if error is not None and not isinstance(error, UserError):
        error = f"{type(error).__name__}: {error}"
    write_json_atomic(Path(hc.runtime.output_dir) / JOB_JSON, {
        "overrides": list(hc.overrides.task), "recipe": recipe, "engine": str(engine_dir) if engine_dir else None,
        "status": "ok" if error is None else "failed", "error": None if error is None else str(error),
        "seconds": round(time.perf_counter() - t0, 2),
        "validation": _read_json(val)})


def _read_json(path: Path | None):
    import json

    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


@user_errors_exit
def main() -> None:
    import hydra

    config.setup()
    argv = sys.argv[1:]
    if not any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in argv):
        config.precheck(_overrides(argv))
    hydra.main(version_base="1.3", config_path=str(config.conf_dir()), config_name="config")(_job)()
    if _failures:
        for f in _failures:
            print(f"error: {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
