"""sha256 of source files, remembered by (path, size, mtime) so a rebuild does not re-hash GBs."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.format import sha256_file

from ..store import write_json_atomic


def file_digests(files: list[Path], base: Path, store) -> dict[str, str]:
    cache_path = store.root / ".cache" / "digests.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out, dirty = {}, False
    for f in sorted(files):
        st = f.stat()
        key = str(f.resolve())
        stamp = cache.get(key)
        if stamp and stamp[:2] == [st.st_size, st.st_mtime_ns]:
            out[f.relative_to(base).as_posix()] = stamp[2]
            continue
        h = sha256_file(f)
        cache[key] = [st.st_size, st.st_mtime_ns, h]
        out[f.relative_to(base).as_posix()] = h
        dirty = True
    if dirty:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_path, cache)
    return out
