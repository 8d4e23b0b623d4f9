"""The engine directory format: file names, the manifest, and its verification."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import EngineError

FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
MANIFEST_JSON = "manifest.json"
VALIDATION_JSON = "validation.json"
TOKENIZER_DIR = "tokenizer"
# Written after the build, outside the manifest (validation results may be refreshed).
REPORT_MD = "report.md"
UNHASHED_FILES = (MANIFEST_JSON, VALIDATION_JSON, REPORT_MD)


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_entries(engine_dir: Path) -> dict[str, dict]:
    """sha256 and size of every file of the engine except the unhashed ones, by relative path."""
    out = {}
    for p in sorted(engine_dir.rglob("*")):
        rel = p.relative_to(engine_dir).as_posix()
        if p.is_file() and rel not in UNHASHED_FILES:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def _verify_cache_path() -> Path:
    root = os.environ.get("EF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "engine-factory")
    return Path(root) / "verified.json"


def _load_verify_cache() -> dict:
    try:
        return json.loads(_verify_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_verify_cache(cache: dict) -> None:
    path = _verify_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache only saves time


def verify_manifest(engine_dir: Path, mode: str = "full") -> dict:
    """Check every file the manifest lists: size always, sha256 when mode == "full".

    A verified file is remembered by (path, size, mtime) so that repeated loads stay fast.
    """
    engine_dir = Path(engine_dir)
    mpath = engine_dir / MANIFEST_JSON
    if not mpath.is_file():
        raise EngineError(f"{engine_dir}: no {MANIFEST_JSON}, so this is not a complete engine; "
                          "rebuild it with `python -m engine_factory ...`")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise EngineError(f"{mpath}: unreadable manifest ({e}); rebuild the engine") from None
    if mode == "none":
        return manifest
    cache = _load_verify_cache() if mode == "full" else {}
    dirty = False
    for rel, entry in files.items():
        p = engine_dir / rel
        try:
            st = p.stat()
        except OSError:
            raise EngineError(f"{p}: listed in the manifest but missing; rebuild the engine") from None
        if st.st_size != entry["size"]:
            raise EngineError(f"{p}: size {st.st_size} differs from the manifest's {entry['size']} "
                              "(truncated or modified); rebuild the engine")
        if mode != "full":
            continue
        key = str(p.resolve())
        stamp = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        if cache.get(key) == stamp:
            continue
        if sha256_file(p) != entry["sha256"]:
            raise EngineError(f"{p}: sha256 differs from the manifest (corrupted or tampered); "
                              "rebuild the engine")
        cache[key] = stamp
        dirty = True
    if dirty:
        _save_verify_cache(cache)
    return manifest
