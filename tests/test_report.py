"""The sweep report: every job of a multirun records itself (job.json), and the report of the sweep
(report.md, report.json, PNG plots) is written at its end and again, identically, by
`python -m engine_factory.report`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine_factory.report import SweepReport, write_report
from helpers import LIMITS, run_module

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep_dir(store: Path) -> Path:
    (sweep,) = (store / "sweeps").iterdir()
    return sweep


def _table(md: str) -> list[list[str]]:
    """The cells of the first markdown table's data rows."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| point |")) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] >= 400 and im.size[1] >= 150


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_llama):
    """One three-precision sweep of the tiny LLaMA."""
    cwd = tmp_path_factory.mktemp("sweep")
    store = cwd / "store"
    result = run_module("engine_factory", "-m", "precision=fp32,fp16,bf16", f"model.source={tiny_llama}",
                        f"store={store}", *LIMITS, cwd=cwd)
    rc, out, err = result
    assert rc == 0, err[-3000:]
    return {"dir": _sweep_dir(store), "out": out}


def test_each_job_records_itself(sweep):
    jobs = [json.loads((sweep["dir"] / str(i) / "job.json").read_text()) for i in range(3)]
    assert [j["overrides"][0] for j in jobs] == ["precision=fp32", "precision=fp16", "precision=bf16"]
    for j in jobs:
        assert j["status"] == "ok" and j["error"] is None and j["recipe"] is None
        assert Path(j["engine"]).is_dir() and j["seconds"] > 0
        assert j["validation"] == json.loads((Path(j["engine"]) / "validation.json").read_text())


def test_sweep_ends_with_a_report_of_every_point(sweep):
    d = sweep["dir"]
    assert sweep["out"].strip().splitlines()[-1] == f"report: {d / 'report.md'}"
    md = (d / "report.md").read_text()
    report = json.loads((d / "report.json").read_text())
    points = report["points"]
    assert [p["label"] for p in points] == ["precision=fp32", "precision=fp16", "precision=bf16"]
    assert f"`store={d.parent.parent}`" in md  # the overrides every point shares are named once
    rows = _table(md)
    assert len(rows) == 3
    for p, row in zip(points, rows):
        engine = Path(p["engine"])
        size = sum(f.stat().st_size for f in engine.glob("rank*.safetensors"))
        parity = json.loads((engine / "validation.json").read_text())["parity"]
        assert p["size_bytes"] == size
        for key in ("max_rel_logits", "max_abs_logits", "token_agreement", "greedy_identical"):
            assert p[key] == parity[key], key
        rel = "0" if parity["max_rel_logits"] == 0 else f"{parity['max_rel_logits']:.2e}"
        assert row == [f"`{p['label']}`", "ok", json.loads((engine / "engine.json").read_text())["dtype"],
                       f"{size / 1e6:.3f}", rel, f"{parity['token_agreement']:.3f}", "—", "—", "—"]
    fp32, fp16, bf16 = (p["size_bytes"] for p in points)
    assert fp16 == pytest.approx(bf16, rel=0.01) and fp32 / fp16 == pytest.approx(2, rel=0.02)  # headers differ
    assert "## Failed points" not in md


def test_plots_are_pngs_linked_from_the_report(sweep):
    d = sweep["dir"]
    md = (d / "report.md").read_text()
    for name in ("size.png", "parity.png"):
        _assert_png(d / name)
        assert f"]({name})" in md
    # nothing measured ROUGE or speed here: no empty panels
    assert not (d / "rouge1.png").exists() and not (d / "tokens_per_s.png").exists()


def test_report_command_rewrites_it_identically(sweep, tmp_path):
    d = sweep["dir"]
    names = ("report.md", "report.json", "size.png", "parity.png")
    before = {n: (d / n).read_bytes() for n in names}
    rc, out, err = run_module("engine_factory.report", d)
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == str(d / "report.md")
    assert {n: (d / n).read_bytes() for n in names} == before
    rc, out, err = run_module("engine_factory.report", d, "--out", tmp_path / "elsewhere")
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "elsewhere" / "report.md")
    assert {n: (tmp_path / "elsewhere" / n).read_bytes() for n in names} == before


def test_a_failed_point_is_listed_and_fails_the_sweep(tiny_llama, cli, store):
    # fp16 cannot meet a zero logits error: the first point fails inside its job, the second builds
    rc, out, err = cli("-m", "precision=fp16", "validate.max_rel_logits=0,1", f"model.source={tiny_llama}",
                       f"store={store}", *LIMITS)
    assert rc == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: job 0 (precision=fp16 validate.max_rel_logits=0")
    d = _sweep_dir(store)
    failed = json.loads((d / "0" / "job.json").read_text())
    assert failed["status"] == "failed" and failed["engine"] is None
    assert "max_rel_logits" in failed["error"] and "> 0" in failed["error"]
    md = (d / "report.md").read_text()
    rows = _table(md)
    assert [r[:3] for r in rows] == [["`validate.max_rel_logits=0`", "failed", "—"],
                                     ["`validate.max_rel_logits=1`", "ok", "float16"]]
    assert "1 ok, 1 failed" in md
    failures = md.split("## Failed points", 1)[1].split("##", 1)[0]
    assert f"`validate.max_rel_logits=0` (job 0, {failed['seconds']:.1f} s): {failed['error']}" in failures
    assert "validate.max_rel_logits=1" not in failures
    for name in ("size.png", "parity.png"):
        _assert_png(d / name)


# ---- ROUGE-1, speed and damaged sweeps, on hand-made records (no build) --------------------------------
def _engine(root: Path, name: str, dtype: str, rank_bytes: int, validation: dict, source="abc") -> Path:
    engine = root / name
    engine.mkdir(parents=True)
    (engine / "engine.json").write_text(json.dumps({
        "name": name, "hash": name * 4, "dtype": dtype, "quant": {"mode": "none"},
        "mapping": {"tp": 1, "pp": 1}, "source": {"type": "hf_folder", "path": f"/x/{name}", "files": {"w": source}},
        "spec": {"hidden_size": 8}}))
    (engine / "manifest.json").write_text(json.dumps({"files": {
        "engine.json": {"size": 100, "sha256": "0"}, "rank0.safetensors": {"size": rank_bytes, "sha256": "0"},
        "tokenizer/tokenizer.json": {"size": 7, "sha256": "0"}}}))
    (engine / "validation.json").write_text(json.dumps(validation))
    return engine


def _job(sweep: Path, num: int, overrides: list[str], engine: Path | None, error: str | None = None,
         validation: dict | None = None) -> None:
    (sweep / str(num)).mkdir(parents=True)
    if validation is None and engine is not None:  # what a job records: the engine's validation.json then
        validation = json.loads((engine / "validation.json").read_text())
    (sweep / str(num) / "job.json").write_text(json.dumps({
        "overrides": overrides, "recipe": "r", "engine": str(engine) if engine else None,
        "status": "failed" if error else "ok", "error": error, "seconds": 1.5, "validation": validation}))


def _validation(rel: float, rouge1: float | None = None, tok_s: float | None = None) -> dict:
    val = {"bounds": {"max_rel_logits": 0.02}, "parity": {"max_rel_logits": rel, "max_abs_logits": rel * 10,
                                                          "token_agreement": 1.0, "greedy_identical": True}}
    if rouge1 is not None:
        val["task"] = {"engine": {"rouge1": rouge1, "rouge2": 1.0}, "hf": {"rouge1": 30.0}}
    if tok_s is not None:
        val["speed"] = {"decode_tok_s": tok_s}
    return val


def test_rouge_deltas_speed_and_unrecorded_jobs(tmp_path):
    store, sweep = tmp_path / "store", tmp_path / "store" / "sweeps" / "t"
    fp32 = _engine(store, "m-32", "float32", 4_000_000, _validation(0.0, rouge1=30.25, tok_s=120.0))
    fp16 = _engine(store, "m-16", "float16", 2_000_000, _validation(1e-3, rouge1=29.75, tok_s=210.5))
    bf16 = _engine(store, "m-bf", "bfloat16", 2_000_000, _validation(1e-2))  # no task, no speed
    other = _engine(store, "o-16", "float16", 2_000_000, _validation(1e-3, rouge1=20.0), source="other")
    _job(sweep, 0, ["precision=fp32", "x=1"], fp32)
    _job(sweep, 1, ["precision=fp16", "x=1"], fp16)
    # the job's copy of validation.json wins over the file, which a later build may have rewritten
    _job(sweep, 2, ["precision=bf16", "x=1"], bf16, validation=_validation(2e-2))
    _job(sweep, 3, ["precision=fp16", "model=o", "x=1"], other)
    _job(sweep, 4, ["precision=int8", "x=1"], None, error="validation of m failed: token_agreement 0.5 < 0.9")
    (sweep / "5" / ".hydra").mkdir(parents=True)  # started, never recorded (killed)
    (sweep / "5" / ".hydra" / "overrides.yaml").write_text("- precision=fp8\n- x=1\n")
    md_path = write_report(sweep)
    report = json.loads((sweep / "report.json").read_text())
    by_label = {p["label"]: p for p in report["points"]}
    assert list(by_label) == ["precision=fp32", "precision=fp16", "precision=bf16", "precision=fp16 model=o",
                              "precision=int8", "precision=fp8"]
    assert by_label["precision=fp16"]["rouge1_delta_vs_fp32"] == pytest.approx(-0.5)
    assert by_label["precision=fp32"]["rouge1_delta_vs_fp32"] == 0.0
    assert by_label["precision=fp16 model=o"]["rouge1_delta_vs_fp32"] is None  # no fp32 of that model
    assert by_label["precision=bf16"]["rouge1"] is None and by_label["precision=bf16"]["decode_tok_s"] is None
    assert by_label["precision=fp16"]["size_bytes"] == 2_000_000  # rank files only
    assert by_label["precision=bf16"]["max_rel_logits"] == 2e-2
    assert by_label["precision=fp8"]["status"] == "no record"
    rows = {r[0]: r for r in _table(md_path.read_text())}
    assert rows["`precision=fp32`"][2:] == ["float32", "4.000", "0", "1.000", "30.25", "ref", "120.0"]
    assert rows["`precision=fp16`"][6:] == ["29.75", "-0.50", "210.5"]
    assert rows["`precision=bf16`"][6:] == ["—", "—", "—"]
    assert rows["`precision=int8`"][1] == "failed" and rows["`precision=fp8`"][1] == "no record"
    md = md_path.read_text()
    assert "token_agreement 0.5 < 0.9" in md and "killed or crashed" in md
    for name in ("size.png", "parity.png", "rouge1.png", "tokens_per_s.png"):
        _assert_png(sweep / name)
        assert f"]({name})" in md


def test_the_callback_logs_instead_of_raising(tmp_path, caplog):
    empty = tmp_path / "sweep"
    empty.mkdir()
    with caplog.at_level(logging.ERROR, logger="engine_factory.report"):
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))
    assert "sweep report" in caplog.text and "no */job.json" in caplog.text
    assert not (empty / "report.md").exists()


def test_report_of_a_folder_that_is_no_sweep_is_one_line(tmp_path):
    rc, out, err = run_module("engine_factory.report", tmp_path / "nowhere")
    assert rc == 2 and err.strip().count("\n") == 0 and "no such sweep folder" in err
