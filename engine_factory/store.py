"""The content-addressed store: engine folders, stage caches, temporary build dirs and locks."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from runtime.errors import UserError
from runtime.format import MANIFEST_JSON

log = logging.getLogger(__name__)


def default_store() -> str:
    if os.environ.get("EF_STORE"):
        return os.environ["EF_STORE"]
    from platformdirs import user_cache_dir

    return os.path.join(user_cache_dir("engine-factory"), "store")


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".locks").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"store={root}: cannot create it ({e.strerror}); pass store=<writable folder>") from None

    def cache_dir(self, stage: str, key: str) -> Path:
        return self.root / ".cache" / stage / key

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 3600):
        lock = FileLock(str(self.root / ".locks" / f"{key}.lock"))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise UserError(f"another build of {key[:12]} holds its lock in {self.root}; wait for it") from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def staging(self, final: Path):
        """A temporary folder in the store, renamed to `final` on success and removed on failure."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if final.exists():  # an incomplete leftover (no manifest): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def is_complete_engine(path: Path) -> bool:
    return (path / MANIFEST_JSON).is_file()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
