"""python -m engine_factory.report SWEEP_DIR [--out DIR]: compare the points of a multirun sweep.

Every job of `python -m engine_factory -m ...` leaves a job.json in its folder of the sweep (overrides,
engine, status, error, seconds). The report reads those and, per engine, engine.json, manifest.json
and validation.json, and writes report.md (a table of the points), report.json (the same numbers,
unrounded) and PNG plots: engine size, parity error, and ROUGE-1 and decode tokens/s where validation
measured them. It runs by itself at the end of a sweep (SweepReport, a Hydra callback in
conf/config.yaml). The last stdout line is the path of report.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import textwrap
from pathlib import Path

from hydra.experimental.callback import Callback

from runtime.cli import setup_logging, user_errors_exit
from runtime.errors import UserError
from runtime.format import ENGINE_JSON, MANIFEST_JSON, VALIDATION_JSON

from .store import write_json_atomic

log = logging.getLogger(__name__)

JOB_JSON = "job.json"
_RANK_FILE = re.compile(r"rank\d+\.safetensors")
_DASH = "—"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _jobs(sweep: Path) -> list[dict]:
    """The record of every job folder, in job order; a folder that Hydra made but whose job never
    recorded itself (killed, crashed hard) still shows, with its overrides."""
    import yaml

    jobs = []
    for d in sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: (not p.name.isdigit(),
                                                                                int(p.name) if p.name.isdigit() else 0, p.name)):
        job = _read(d / JOB_JSON)
        if job is None and (d / ".hydra" / "overrides.yaml").is_file():
            job = {"overrides": yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or [],
                   "status": "no record", "error": f"{d / JOB_JSON} is missing: the job was killed or crashed"}
        if job is not None:
            jobs.append({"job": d.name, **job})
    return jobs


def _model_key(info: dict) -> str:
    """Same weights and architecture, whatever the precision (source paths do not count; nor does the tie of the
    lm_head, which an engine with its own quantized head unties: plan.engine_spec)."""
    source = {k: v for k, v in (info.get("source") or {}).items() if k not in ("path", "cache_path")}
    spec = {k: v for k, v in (info.get("spec") or {}).items() if k != "tie_word_embeddings"}
    return json.dumps({"source": source, "spec": spec}, sort_keys=True)


def _point(job: dict) -> tuple[dict, str | None]:
    """One row of numbers (None where not measured) and its model key."""
    row = {k: job.get(k) for k in ("job", "overrides", "recipe", "status", "error", "seconds", "engine")}
    engine = Path(job["engine"]) if job.get("engine") else None
    info = _read(engine / ENGINE_JSON) if engine else None
    if engine and info is None:
        row["error"] = f"{engine / ENGINE_JSON} is unreadable or gone"
    info, manifest = info or {}, (_read(engine / MANIFEST_JSON) if engine else None) or {}
    # the job's own copy: a later build of the same engine with other validate settings rewrites the file
    val = (job["validation"] if "validation" in job else _read(engine / VALIDATION_JSON) if engine else None) or {}
    parity = val.get("parity") or {}
    files = manifest.get("files") or {}
    row.update({
        "name": info.get("name"), "hash": info.get("hash"), "dtype": info.get("dtype"),
        "quant": _get(info, "quant", "mode"), "tp": _get(info, "mapping", "tp"), "pp": _get(info, "mapping", "pp"),
        "size_bytes": sum(e["size"] for rel, e in files.items() if _RANK_FILE.fullmatch(rel)) if files else None,
        "max_rel_logits": parity.get("max_rel_logits"), "max_abs_logits": parity.get("max_abs_logits"),
        "token_agreement": parity.get("token_agreement"), "greedy_identical": parity.get("greedy_identical"),
        "parity_skipped": parity.get("skipped"), "max_rel_logits_bound": _get(val, "bounds", "max_rel_logits"),
        "rouge1": _get(val, "task", "engine", "rouge1"), "decode_tok_s": _get(val, "speed", "decode_tok_s"),
        "speed_setting": (f"batch {_get(val, 'speed', 'batch')}, {_get(val, 'speed', 'device')}"
                          if val.get("speed") else None),
    })
    return row, (_model_key(info) if info else None)


def _labels(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Short point names: the overrides that differ between points; and the ones common to all."""
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)] if len(rows) > 1 else []
    labels = [" ".join(o for o in r["overrides"] if o not in common) or "(defaults)" for r in rows]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{r['job']}" for lab, r in zip(labels, rows)]
    return labels, common


def _rouge_deltas(rows: list[dict], keys: list[str | None]) -> None:
    """ROUGE-1 minus that of the fp32 point of the same model (the same mapping if there is one)."""
    refs = [i for i, r in enumerate(rows) if r["status"] == "ok" and r["dtype"] == "float32"
            and r["quant"] in (None, "none") and r["rouge1"] is not None]
    for i, r in enumerate(rows):
        same = [j for j in refs if keys[j] is not None and keys[j] == keys[i]]
        same.sort(key=lambda j: (rows[j]["tp"], rows[j]["pp"]) != (r["tp"], r["pp"]))
        ref = same[0] if same and r["rouge1"] is not None else None
        r["rouge1_ref_job"] = rows[ref]["job"] if ref is not None else None
        r["rouge1_delta_vs_fp32"] = r["rouge1"] - rows[ref]["rouge1"] if ref is not None else None


def collect(sweep_dir: Path) -> dict:
    sweep = Path(sweep_dir).expanduser().resolve()
    if not sweep.is_dir():
        raise UserError(f"{sweep}: no such sweep folder (Hydra prints it; default <store>/sweeps/<time>)")
    jobs = _jobs(sweep)
    if not jobs:
        raise UserError(f"{sweep}: no */{JOB_JSON} in it; is it the folder of a `python -m engine_factory -m` "
                        "sweep (made by a version that records its jobs)?")
    rows, keys = zip(*map(_point, jobs))
    rows = list(rows)
    labels, common = _labels(rows)
    for r, label in zip(rows, labels):
        r["label"] = label
    _rouge_deltas(rows, list(keys))
    return {"sweep_dir": str(sweep), "common_overrides": common, "points": rows}


# ---- markdown --------------------------------------------------------------------------------------
def _f(v, spec: str, suffix: str = "") -> str:
    return _DASH if v is None else "0" if v == 0 and "e" in spec else f"{v:{spec}}{suffix}"


def _mb(n) -> str:
    return _DASH if n is None else f"{n / 1e6:,.1f}" if n >= 1e7 else f"{n / 1e6:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(report: dict, plots: list[tuple[str, str]]) -> str:
    rows = report["points"]
    failed = [r for r in rows if r["status"] != "ok"]
    lines = ["# Sweep report", "",
             f"`{report['sweep_dir']}`: {len(rows)} points, {len(rows) - len(failed)} ok, {len(failed)} failed."]
    if report["common_overrides"]:
        lines += ["", "Common to every point: " + " ".join(f"`{_cell(o)}`" for o in report["common_overrides"])]
    lines += ["", "| point | status | dtype | size MB | max rel Δlogits | token agreement | ROUGE-1 "
              "| ΔROUGE-1 vs fp32 | tokens/s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rel = "skipped" if r["parity_skipped"] else _f(r["max_rel_logits"], ".2e")
        delta = ("ref" if r["rouge1_ref_job"] == r["job"] else _f(r["rouge1_delta_vs_fp32"], "+.2f"))
        lines.append(f"| `{_cell(r['label'])}` | {r['status']} | {r['dtype'] or _DASH} | {_mb(r['size_bytes'])} "
                     f"| {rel} | {_f(r['token_agreement'], '.3f')} | {_f(r['rouge1'], '.2f')} | {delta} "
                     f"| {_f(r['decode_tok_s'], ',.1f')} |")
    lines += ["", "Size: the rank files. Max rel Δlogits: max |engine − reference| / max |reference| over the "
              "validation prompts; token agreement: the engine's teacher-forced greedy tokens that equal the "
              "reference's. ROUGE-1 in percent; tokens/s: decode, from validation's speed snapshot."]
    if failed:
        lines += ["", "## Failed points", ""]
        lines += [f"- `{_cell(r['label'])}` (job {r['job']}, {_f(r['seconds'], '.1f', ' s')}): {_cell(r['error'] or '')}"
                  for r in failed]
    built = [r for r in rows if r["engine"]]
    if built:
        lines += ["", "## Engines", "", "| point | engine | quant | tp × pp | max abs Δlogits | greedy identical "
                  "| job s |", "| --- | --- | --- | --- | ---: | --- | ---: |"]
        for r in built:
            greedy = _DASH if r["greedy_identical"] is None else "yes" if r["greedy_identical"] else "no"
            lines.append(f"| `{_cell(r['label'])}` | `{r['engine']}` | {r['quant'] or _DASH} | {r['tp']} × {r['pp']} "
                         f"| {_f(r['max_abs_logits'], '.2e')} | {greedy} | {_f(r['seconds'], '.1f')} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{title}]({name})" for title, name in plots]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------
def _short(label: str) -> str:
    words = [w if len(w) <= 40 else f"{w[:18]}…{w[-18:]}" for w in label.split()]
    return textwrap.fill(" ".join(words), 32)


def _log_axis(ax, ys, values, bounds) -> list:
    """Dots on a log scale, with the validate bound of each point; where each value is drawn."""
    positive = [v for v in values if v] + [b for b in bounds if b]
    left = 10 ** math.floor(math.log10(min(positive, default=1e-6)) + 1e-9)
    if 0 in values:  # a log scale has no 0: exact points go left of everything else
        left /= 10
    xs = [None if v is None else max(v, left * 2) for v in values]
    ax.set_xscale("log")
    ax.set_xlim(left, 10 ** (math.ceil(math.log10(max(positive, default=1e-6))) + 1))  # whole decades
    ax.scatter([x for x in xs if x is not None], [y for y, x in zip(ys, xs) if x is not None], s=60,
               color="#4C72B0", zorder=3, label="measured")
    if any(bounds):
        ax.scatter([b for b in bounds if b], [y for y, b in zip(ys, bounds) if b], marker="|", s=200,
                   color="#C44E52", zorder=3, label="validate bound\n(fails above)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return xs


def _panel(path: Path, rows, labels, values, texts, title: str, xlabel: str, bounds=None) -> None:
    """One horizontal chart, a row per point (first on top): bars, or dots on a log scale with bounds."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    n, ys = len(rows), list(range(len(rows)))
    fig = Figure(figsize=(8, 1.4 + 0.5 * n + 0.15 * sum(lab.count("\n") for lab in labels)), dpi=110)
    ax = fig.subplots()
    if bounds is not None:
        xs = _log_axis(ax, ys, values, bounds)
        # above the dot, clear of the bound's tick on the same row
        place = {"xytext": (0, 9), "ha": "center", "va": "bottom"}
    else:
        xs = values
        ax.barh([y for y, v in zip(ys, values) if v is not None], [v for v in values if v is not None],
                color="#4C72B0", height=0.6, zorder=2)
        room = min(0.5, (8 * max(map(len, texts)) + 16) / 600)  # of the axes' width, for the longest value
        ax.set_xlim(0, max([v for v in values if v is not None] + [1e-12]) / (1 - room))
        place = {"xytext": (6, 0), "va": "center"}
    ax.grid(axis="x", alpha=0.3)
    beside = blended_transform_factory(ax.transAxes, ax.transData)
    for y, r, x, text in zip(ys, rows, xs, texts):
        if x is not None:
            ax.annotate(text, (x, y), textcoords="offset points", fontsize=9, **place)
        else:
            ax.text(0.01, y, "not measured" if r["status"] == "ok" else r["status"], transform=beside,
                    va="center", fontsize=9, color="#C44E52", style="italic")
    ax.set_yticks(ys, labels)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path)


def _rouge_text(r: dict) -> str:
    if r["rouge1_delta_vs_fp32"] is None or r["rouge1_ref_job"] == r["job"]:
        return f"{r['rouge1']:.2f}"
    return f"{r['rouge1']:.2f} ({r['rouge1_delta_vs_fp32']:+.2f} vs fp32)"


def _plots(report: dict, out: Path) -> list[tuple[str, str]]:
    """The PNGs (size and parity always; ROUGE-1 and speed when measured): [(title, file name)]."""
    rows = report["points"]
    labels = [_short(r["label"]) for r in rows]
    rel = [r["max_rel_logits"] for r in rows]
    settings = {r["speed_setting"] for r in rows if r["speed_setting"]}
    speed_label = "decode speed (tokens/s" + (f", {settings.pop()})" if len(settings) == 1 else ")")
    panels = [
        ("size.png", [None if r["size_bytes"] is None else r["size_bytes"] / 1e6 for r in rows],
         [_mb(r["size_bytes"]) for r in rows], "Engine size per point", "engine size (MB = 10⁶ bytes, rank files)",
         None),
        ("parity.png", rel, ["0 (exact)" if v == 0 else _f(v, ".2e") for v in rel], "Parity error vs the reference",
         "max |Δlogits| / max |reference logits| (log scale)", [r["max_rel_logits_bound"] for r in rows]),
        ("rouge1.png", [r["rouge1"] for r in rows], [_rouge_text(r) if r["rouge1"] is not None else "" for r in rows],
         "ROUGE-1 per point", "ROUGE-1 (%)", None),
        ("tokens_per_s.png", [r["decode_tok_s"] for r in rows], [_f(r["decode_tok_s"], ",.1f") for r in rows],
         "Decode speed per point", speed_label, None),
    ]
    made = []
    for name, values, texts, title, xlabel, bounds in panels:
        if any(v is not None for v in values) or name in ("size.png", "parity.png"):
            _panel(out / name, rows, labels, values, texts, title, xlabel, bounds)
            made.append((title, name))
    return made


def write_report(sweep_dir: Path, out: Path | None = None) -> Path:
    """report.md, report.json and the plots, into `out` (default: the sweep folder); report.md's path."""
    report = collect(sweep_dir)
    out = Path(out or report["sweep_dir"]).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    write_json_atomic(out / "report.json", report)
    md = out / "report.md"
    tmp = md.with_name(".report.md.tmp")
    tmp.write_text(_markdown(report, plots))
    tmp.replace(md)
    return md


class SweepReport(Callback):
    """Hydra callback: the sweep's report once every job has run. A report that cannot be written is
    logged; it never turns a finished sweep into a failed one."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = config.hydra.sweep.dir
        try:
            path = write_report(Path(sweep))
        except Exception as e:  # noqa: BLE001 - a report is a summary, never a reason to fail the sweep
            log.error("sweep report of %s not written: %s", sweep, e)
            return
        print(f"report: {path}", flush=True)


@user_errors_exit
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine_factory.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the sweep's folder (<store>/sweeps/<time>)")
    p.add_argument("--out", default=None, help="where to write report.md and the plots (default: sweep_dir)")
    args = p.parse_args(argv)
    setup_logging()
    print(write_report(Path(args.sweep_dir), Path(args.out) if args.out else None))


if __name__ == "__main__":
    main()
