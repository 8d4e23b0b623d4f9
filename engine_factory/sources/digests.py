"""sha256 of source files, remembered in the store (runtime.format.DigestCache: by device, inode, size,
mtime and ctime) so that a rebuild does not re-hash gigabytes and a rewritten file is always re-hashed."""
from __future__ import annotations

from pathlib import Path

from runtime.format import DigestCache


def file_digests(files: list[Path], base: Path, store) -> dict[str, str]:
    cache = DigestCache(store.root / ".cache" / "digests.json")
    out = {f.relative_to(base).as_posix(): cache.sha256(f) for f in sorted(files)}
    cache.save()
    return out
