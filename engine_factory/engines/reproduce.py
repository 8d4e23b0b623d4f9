"""python -m engine_factory.engines --reproduce / --record: rebuild the recipes that record their results
in a fresh store and check the engine hash, each rank file's sha256 and the validation bounds against
the recipe's expect: block, or write the new hash and sha256 into it."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from runtime.errors import UserError
from runtime.format import ENGINE_JSON, VALIDATION_JSON, sha256_file

from . import Check, Outcome, _error_of, build, validation_checks, why_not

RECORD_HINT = "if the change is intended, run `python -m engine_factory.engines --record --recipes {name}` " \
              "and commit the recipe"


def byte_checks(expect: dict, engine: Path) -> list[Check]:
    """engine.json's hash and each rank file's sha256 against the recorded ones (full values on failure)."""
    got = json.loads((engine / ENGINE_JSON).read_text())["hash"]
    want = expect.get("hash")
    checks = [Check("hash", got == want, f"{got[:16]}…" if got == want else f"recorded {want}, rebuilt {got}")]
    recorded = dict(expect.get("rank_sha256") or {})
    for rank in sorted(set(recorded) | {p.name for p in engine.glob("rank*.safetensors")}):
        new = sha256_file(engine / rank) if (engine / rank).is_file() else "(no such file)"
        old = recorded.get(rank, "(not recorded)")
        checks.append(Check(f"sha256 {rank}", new == old, f"{new[:16]}…" if new == old else
                            f"recorded {old}, rebuilt {new}"))
    return checks


# ---- writing the expect: block ----------------------------------------------------------------------
def _scalar(s: str) -> str:
    import yaml

    return s if yaml.safe_load(s) == s else json.dumps(s)  # e.g. a hex digest that reads as a number


def rewrite_expect(text: str, digest: str, ranks: dict[str, str]) -> str:
    """The recipe text with expect.hash and expect.rank_sha256 replaced (or added); the rest of the file,
    the rest of the expect block and its comments, kept as they are."""
    import yaml

    old = (yaml.safe_load(text) or {}).get("expect") or {}
    lines = text.rstrip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"expect\s*:", line)), None)
    inline = start is not None and re.sub(r"#.*", "", lines[start]).split(":", 1)[1].strip()
    if start is None or inline:  # no block yet, or a flow-style one: write it as a block (drops its comments)
        end = len(lines) if start is None else _block_end(lines, start)
        rest = {k: v for k, v in old.items() if k not in ("hash", "rank_sha256")}
        body = ["  " + line for line in yaml.safe_dump(rest, sort_keys=False).splitlines()] if rest else []
        head = lines if start is None else lines[:start]
        lines = head + ["expect:  # checked by `make reproduce`"] + body + lines[end:]
        start = len(head)
    end = _block_end(lines, start)
    kept, skip_deeper_than = [], None
    for line in lines[start + 1:end]:
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = None
        if re.match(r"\s+(hash|rank_sha256)\s*:", line):
            skip_deeper_than = indent
            continue
        kept.append(line)
    new = ([lines[start], f"  hash: {_scalar(digest)}", "  rank_sha256:"]
           + [f"    {rank}: {_scalar(sha)}" for rank, sha in sorted(ranks.items())] + kept)
    out = "\n".join(lines[:start] + new + lines[end:]) + "\n"
    want = {**old, "hash": digest, "rank_sha256": dict(sorted(ranks.items()))}
    if (yaml.safe_load(out) or {}).get("expect") != want:
        raise UserError("could not rewrite the expect: block of this recipe in place; write expect.hash and "
                        "expect.rank_sha256 by hand")
    return out


def _block_end(lines: list[str], start: int) -> int:
    """The first line after `start` that begins another top-level key."""
    return next((i for i in range(start + 1, len(lines))
                 if lines[i].strip() and not lines[i][0].isspace() and not lines[i].startswith("#")), len(lines))


def rebuild_and_check(cfgs: dict, record: bool) -> list[Outcome]:
    """Each recipe built in a fresh store (a real rebuild: no cached fetch, convert or engine), then
    checked; with record, its expect block rewritten instead of checking the bytes."""
    outcomes = []
    for name, cfg in cfgs.items():
        store = Path(tempfile.mkdtemp(prefix=f"ef-reproduce-{name}-"))
        reason = why_not(cfg, store)
        if reason and reason.startswith("needs CUDA"):  # recorded on a GPU machine: nothing to say here
            print(f"  skip  {name}: {reason}", flush=True)
            outcomes.append(Outcome(name, "skipped", reason))
            shutil.rmtree(store)
            continue
        t0 = time.perf_counter()
        rc, engine, err = (1, None, f"error: {reason}") if reason else build(name, store)
        o = Outcome(name, "failed", _error_of(err), time.perf_counter() - t0)
        failed_report = next(store.glob(f"failed/*.{VALIDATION_JSON}"), None)
        if engine is None and failed_report is None:
            o.checks = []
            print(f"  FAIL  {name}  build: {o.detail}", flush=True)
        else:  # built, or refused by validation (the pipeline checks expect.validation too; kept report)
            o.checks = ([Check("validate", False, f"the build refused the engine, its bytes are not checked: "
                               f"{o.detail}")] + validation_checks(cfg, failed_report) if engine is None else
                        ([] if record else byte_checks(cfg.expect, engine))
                        + validation_checks(cfg, engine / VALIDATION_JSON))
            for c in o.checks:
                print(f"  {'ok' if c.ok else 'FAIL':4}  {name}  {c.what}: {c.detail}", flush=True)
            bad = [c.what for c in o.checks if not c.ok]
            o.result, o.detail = ("failed", ", ".join(bad)) if bad else ("ok", "all checks pass")
            if record and not bad:
                o.detail = _record(name, engine)
                print(f"  {'ok':4}  {name}  {o.detail}", flush=True)
        if o.result == "failed":
            print(f"        {name}: the rebuild is kept in {store}", flush=True)
        else:
            shutil.rmtree(store, ignore_errors=True)
        outcomes.append(o)
    return outcomes


def _record(name: str, engine: Path) -> str:
    from ..paths import recipes_dir

    digest = json.loads((engine / ENGINE_JSON).read_text())["hash"]
    ranks = {p.name: sha256_file(p) for p in sorted(engine.glob("rank*.safetensors"))}
    path = recipes_dir() / f"{name}.yaml"
    old = path.read_text()
    new = rewrite_expect(old, digest, ranks)
    if new == old:
        return f"unchanged: hash {digest[:16]}…"
    path.write_text(new)
    return f"recorded hash {digest[:16]}… and the sha256 of {len(ranks)} rank files in {path}"


def advice(o: Outcome) -> str:
    failed = [c.what for c in o.checks if not c.ok]
    changed = [w for w in failed if w == "hash" or w.startswith("sha256 ")]
    worse = [w for w in failed if w not in changed]
    parts = []
    if changed:
        parts.append(f"{o.name}: the rebuilt engine's bytes differ from the recorded ones ({', '.join(changed)}); "
                     + RECORD_HINT.format(name=o.name))
    if worse:
        parts.append(f"{o.name}: validation misses the recipe's expect.validation ({', '.join(worse)}): fix the "
                     f"regression, or if the new numbers are intended, edit expect.validation in recipes/{o.name}.yaml")
    if not o.checks:
        parts.append(f"{o.name}: the build failed: {o.detail}")
    return "\n".join(parts)
