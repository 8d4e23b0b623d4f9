"""Sweeps through Hydra's launcher plugins (the `[launchers]` extra): joblib (local parallel jobs) and
submitit_local (the local twin of submitit_slurm, which sends each point to Slurm): every point builds the
same engine as a plain build, and the sweep report covers both points."""
from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import engines_in

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", ["hydra.launcher.n_jobs=2"]),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", ["hydra.launcher.timeout_min=10"]),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_point_sweep_through_a_launcher(launcher, cli, store, need_shared):
    module, extra = LAUNCHERS[launcher]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install '.[launchers]')")
    need_shared("models/stories260K")
    rc, out, err = cli("-m", "recipe=stories260k_fp32", "precision=fp32,bf16", "validate.enabled=false",
                       f"store={store}", f"hydra/launcher={launcher}", *extra)
    assert rc == 0, err[-3000:]
    engines = engines_in(store)
    assert len(engines) == 2
    (sweep,) = (store / "sweeps").iterdir()
    report = json.loads((sweep / "report.json").read_text())
    points = report["points"]
    assert len(points) == 2 and all(p["status"] == "ok" for p in points)
    # the same engines as plain builds (cache hits: the engine's name and hash do not depend on the launcher)
    from engine_factory import config, pipeline

    for dtype in ("fp32", "bf16"):
        cfg = config.compose(["recipe=stories260k_fp32", f"precision={dtype}", "validate.enabled=false",
                              f"store={store}"])
        assert pipeline.run(cfg, recipe="stories260k_fp32") in engines
