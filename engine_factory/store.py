"""The content-addressed store: engine folders, stage caches, temporary build dirs and locks.

Every write goes through a staging folder (`.tmp-*`) renamed into place, and each staging folder is held by
a lock of its own for as long as it lives: a staging folder whose lock nobody holds was left by a killed
build, and the next build in the store removes it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from runtime.errors import UserError
from runtime.format import MANIFEST_JSON

log = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
# A name that becomes one path component in the store: no separators, no "..", nothing hidden.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def default_store() -> str:
    if os.environ.get("EF_STORE"):
        return os.environ["EF_STORE"]
    from platformdirs import user_cache_dir

    return os.path.join(user_cache_dir("engine-factory"), "store")


def check_name(key: str, value: str) -> str:
    """A user-given name that reaches the file system: letters, digits, '.', '_', '-' only."""
    if not SAFE_NAME.fullmatch(value or "") or ".." in value:
        raise UserError(f"{key}={value!r}: a name may hold only letters, digits, '.', '_' and '-' (no '/', no '..', "
                        "not starting with '.' or '-'); pick another name")
    return value


def safe_name(value: str) -> str:
    """A name derived from something the user did not choose as a name (a source folder): made safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")[:100]  # room for -hash and .tmp-…-xxxx
    return name or "engine"


def _writable(path: Path) -> bool:
    """Can this process create files in `path` (its nearest existing ancestor, when it does not exist yet)?"""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def no_space(path: Path | str, needed: int | None = None) -> UserError:
    free = shutil.disk_usage(_existing(Path(path))).free
    need = f"; the engine needs about {_size(needed)}" if needed else ""
    return UserError(f"no space left on the device of {path} ({_size(free)} free{need}); free some space or "
                     "pass store=<a folder on a disk with room>")


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


class Store:
    """A store folder. Opening one writes nothing: reading a built engine works from a read-only store."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @property
    def writable(self) -> bool:
        return _writable(self.root)

    def prepare(self, what: str) -> None:
        """Make the store ready for writing, or fail with one line saying why."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / ".locks").mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"store={self.root}: cannot write there ({e.strerror}), which {what} needs; pass "
                            "store=<a writable folder>") from None
        if not self.writable:
            raise UserError(f"store={self.root}: the folder is read-only, and {what} needs to write; pass "
                            "store=<a writable folder> (engines already built there still load read-only)")

    def engine_dir(self, name: str, digest: str) -> Path:
        path = self.root / f"{name}-{digest[:12]}"
        assert path.parent == self.root, path  # names were checked: one component, inside the store
        return path

    def cache_dir(self, stage: str, key: str) -> Path:
        return self.root / ".cache" / stage / key

    def _lock_file(self, key: str) -> str:
        return str(self.root / ".locks" / f"{key}.lock")

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 3600):
        lock = FileLock(self._lock_file(key))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise UserError(f"another build of {key[:12]} holds its lock in {self.root}; wait for it") from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def staging(self, final: Path, needed: int | None = None):
        """A temporary folder in the store, renamed to `final` on success and removed on failure. Running out
        of space is one line naming the path. Its lock is taken before the folder exists, so a folder without
        a held lock is always a dead build's."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{STAGING_PREFIX}{final.name}-{secrets.token_hex(4)}"
        held = FileLock(self._lock_file(f"staging-{tmp.name}"))
        held.acquire()
        try:
            tmp.mkdir()
            try:
                yield tmp
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise no_space(final.parent, needed) from None
                raise
            old = None
            if final.exists():  # an incomplete or damaged leftover: moved aside first, so that the name
                old = final.parent / f"{STAGING_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
                os.rename(final, old)  # is only ever missing between two renames
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            held.release()
            _unlink(held.lock_file)

    def remove_stale_staging(self) -> list[Path]:
        """Remove staging folders of builds that died (their lock is free); returns what was removed."""
        removed = []
        parents = [self.root, *(p for p in (self.root / ".cache").glob("*") if p.is_dir())]
        for parent in parents:
            for tmp in parent.glob(f"{STAGING_PREFIX}*"):
                lock = FileLock(self._lock_file(f"staging-{tmp.name}"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # a live build
                try:
                    if tmp.exists():
                        log.warning("removing %s, left by a build that did not finish", tmp)
                        shutil.rmtree(tmp, ignore_errors=True)
                        removed.append(tmp)
                finally:
                    lock.release()
                    _unlink(lock.lock_file)
        return removed


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def is_complete_engine(path: Path) -> bool:
    return (path / MANIFEST_JSON).is_file()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        _unlink(str(tmp))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
