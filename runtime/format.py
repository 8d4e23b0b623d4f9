"""The engine directory format: file names, the manifest, and verify_engine, the one check of an engine.

The manifest lists engine.json, every rank file of the engine's mapping and every tokenizer file, each
with its size and sha256. verify_engine accepts an engine only when that holds and every listed file is a
regular file inside the folder that matches its entry; anything the manifest does not list is never read
(a tokenizer/ holding an unlisted file is refused, since transformers would read it). This detects
corruption and tampering of an engine; it is not a signature: whoever can write the folder can write a
new manifest too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
from pathlib import Path

from .errors import EngineError, UserError
from .spec import ModelSpec

FORMAT_VERSION = 1
ENGINE_JSON = "engine.json"
MANIFEST_JSON = "manifest.json"
VALIDATION_JSON = "validation.json"
TOKENIZER_DIR = "tokenizer"
# Written after the build, outside the manifest (validation results may be refreshed); never read by a load.
REPORT_MD = "report.md"
UNHASHED_FILES = (MANIFEST_JSON, VALIDATION_JSON, REPORT_MD)
VERIFY_MODES = ("full", "size", "none")  # sha256 + size of every listed file | sizes only | layout only
_REBUILD = "rebuild the engine"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- remembered digests ------------------------------------------------------------------------------
def _stamp(st: os.stat_result) -> list[int]:
    # ctime is set by the kernel on every write and metadata change and no system call sets it back, so a
    # file rewritten and then `touch -r`-ed misses; a copy put in its place (cp -p) has a new inode.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """sha256 of files, remembered in a JSON file by (device, inode, size, mtime_ns, ctime_ns) so that
    loading an engine or rebuilding from a source does not re-hash gigabytes. Losing or failing to write
    the cache file only costs time."""

    VERSION = 2

    def __init__(self, path: Path | None):
        self.path = path
        self._files: dict = {}
        self._dirty = False
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
                ok = isinstance(data, dict) and data.get("version") == self.VERSION
                if ok and isinstance(data.get("files"), dict):
                    self._files = data["files"]
            except (OSError, ValueError):
                pass

    def sha256(self, path: Path) -> str:
        key = str(Path(path).resolve())
        stamp = _stamp(os.stat(path))
        hit = self._files.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        digest = sha256_file(path)
        if _stamp(os.stat(path)) == stamp:  # unchanged while it was read: the digest belongs to this stamp
            self._files[key] = {"stamp": stamp, "sha256": digest}
            self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": self.VERSION, "files": self._files}))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass  # a read-only cache folder: the next run hashes again


def verify_cache_path() -> Path:
    root = os.environ.get("EF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "engine-factory")
    return Path(root) / "verified.json"


# ---- reading JSON files of the engine ---------------------------------------------------------------
def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {_REBUILD}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise EngineError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]}); {_REBUILD}") from None
    except OSError as e:
        raise EngineError(f"{path}: cannot be read ({e.strerror}); {_REBUILD}") from None


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the manifest ------------------------------------------------------------------------------------
def _plain_relative(rel) -> bool:
    """A path relative to the engine folder with no way out of it: no root, no '..', '.' or empty parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _parse_manifest(mpath: Path) -> dict:
    manifest = _read_json(mpath)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        what = (f"a {_kind(manifest)}" if not isinstance(manifest, dict)
                else f"\"files\" is {_kind(manifest.get('files'))}")
        raise EngineError(f"{mpath}: must be an object whose \"files\" maps relative paths to {{size, sha256}}, "
                          f"but {what}; {_REBUILD}")
    if "format_version" not in manifest:
        raise EngineError(f"{mpath}: lacks format_version; {_REBUILD}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise EngineError(f"{mpath}: engine format {manifest['format_version']!r} but this runtime reads "
                          f"format {FORMAT_VERSION}; {_REBUILD} with this version")
    for rel, entry in manifest["files"].items():
        if not _plain_relative(rel):
            raise EngineError(f"{mpath}: entry {rel!r} is not a plain relative path inside the engine (absolute, "
                              f"'..' or empty parts); {_REBUILD}")
        if rel in UNHASHED_FILES:
            raise EngineError(f"{mpath}: lists {rel}, which is never part of the manifest; {_REBUILD}")
        ok = (isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
              and all(c in "0123456789abcdef" for c in entry["sha256"]))
        if not ok:
            raise EngineError(f"{mpath}: entry {rel!r} must be {{\"size\": bytes (int >= 0), \"sha256\": 64 "
                              f"lowercase hex digits}}, got {json.dumps(entry)[:80]}; {_REBUILD}")
    return manifest


def _regular_file(engine_dir: Path, rel: str) -> Path:
    """engine_dir/rel, refused unless it and every folder on the way inside the engine are not links."""
    p = engine_dir
    for part in rel.split("/"):
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise EngineError(f"{p}: listed in the manifest but missing; {_REBUILD}") from None
        except OSError as e:
            raise EngineError(f"{p}: cannot be read ({e.strerror}); {_REBUILD}") from None
        if stat.S_ISLNK(st.st_mode):
            raise EngineError(f"{p}: is a symbolic link; engine files must be regular files inside the engine "
                              f"folder (copy the file in place of the link, or {_REBUILD})")
    if not stat.S_ISREG(st.st_mode):
        raise EngineError(f"{p}: not a regular file; {_REBUILD}")
    return p


def _check_file(p: Path, entry: dict, mode: str, cache: DigestCache) -> None:
    if mode == "none":
        return
    size = p.stat().st_size
    if size != entry["size"]:
        raise EngineError(f"{p}: size {size} differs from the manifest's {entry['size']} (truncated or "
                          f"modified); {_REBUILD}")
    if mode == "full" and cache.sha256(p) != entry["sha256"]:
        raise EngineError(f"{p}: sha256 differs from the manifest (corrupted or tampered); {_REBUILD}")


def _check_tokenizer_folder(engine_dir: Path, files: dict) -> None:
    """Everything in tokenizer/ is listed: transformers reads whatever it finds there (added_tokens.json,
    chat_template.jinja, ...), so one unlisted file would change what the engine does."""
    tdir = engine_dir / TOKENIZER_DIR
    if not os.path.lexists(tdir):
        return
    if tdir.is_symlink() or not tdir.is_dir():
        raise EngineError(f"{tdir}: is a symbolic link or not a folder; the engine's tokenizer must be a "
                          f"folder inside the engine (pass another one with --tokenizer_dir, or {_REBUILD})")
    for root, dirs, names in os.walk(tdir):
        for name in sorted(names) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            p = Path(root, name)
            if p.relative_to(engine_dir).as_posix() not in files:
                raise EngineError(f"{p}: not listed in the engine's {MANIFEST_JSON}, so it is not part of the "
                                  f"build and would change the tokenizer; remove it, or {_REBUILD}")


# ---- engine.json -------------------------------------------------------------------------------------
_SPEC_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "int | None": (int, type(None)), "tuple[int, ...]": (list,), "dict[str, Any]": (dict,)}
_SPEC_POSITIVE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_position_embeddings")


def _spec_problem(d) -> str | None:
    if not isinstance(d, dict):
        return f"\"spec\" is {_kind(d)}, not an object"
    fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(d) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        return "spec " + " and ".join(([f"has unknown fields {unknown}"] if unknown else [])
                                      + ([f"lacks fields {missing}"] if missing else []))
    for name, v in d.items():
        want = _SPEC_TYPES.get(str(fields[name].type))
        bad = want is not None and (not isinstance(v, want) or (isinstance(v, bool) and bool not in want))
        if want == (list,) and not bad:
            bad = not all(_is_int(t) for t in v)
        if isinstance(v, float) and not math.isfinite(v):  # JSON's NaN / Infinity
            bad = True
        if bad or (name in _SPEC_POSITIVE and not v > 0) or (name in ("head_dim", "rotary_dim") and v < 0):
            return f"spec.{name}={json.dumps(v)[:40]} is not a valid {fields[name].type}"
    return None


def _engine_config_problem(cfg) -> str | None:
    if not isinstance(cfg, dict):
        return f"a {_kind(cfg)}, not an object"
    missing = [k for k in ("format_version", "spec", "mapping", "limits", "quant", "dtype") if k not in cfg]
    if missing:
        return f"lacks {', '.join(missing)}"
    if cfg["format_version"] != FORMAT_VERSION:
        return f"engine format {cfg['format_version']!r} but this runtime reads format {FORMAT_VERSION}"
    m = cfg["mapping"]
    if not (isinstance(m, dict) and all(_is_int(m.get(k)) and m[k] >= 1 for k in ("tp", "pp"))):
        return f"mapping={json.dumps(m)[:60]} needs tp and pp (ints >= 1)"
    if "world_size" in m and m["world_size"] != m["tp"] * m["pp"]:
        return f"mapping.world_size={m['world_size']!r} is not tp*pp={m['tp'] * m['pp']}"
    lim = cfg["limits"]
    keys = ("max_batch_size", "max_input_len", "max_seq_len")
    if not (isinstance(lim, dict) and all(_is_int(lim.get(k)) and lim[k] >= 1 for k in keys)):
        return f"limits={json.dumps(lim)[:80]} needs {', '.join(keys)} (ints >= 1)"
    q = cfg["quant"]
    if not (isinstance(q, dict) and isinstance(q.get("mode"), str)):
        return f"quant={json.dumps(q)[:60]} needs mode (a string)"
    from .quant import MODES  # (torch: the runtime has it imported already)

    if q["mode"] not in MODES:
        return f"quant mode {q['mode']!r} has no runtime linear here (known: {', '.join(sorted(MODES))})"
    if not isinstance(q.get("lm_head", False), bool):
        return f"quant.lm_head={json.dumps(q['lm_head'])[:40]} is not true or false"
    if q.get("lm_head") and not MODES[q["mode"]].lm_head:
        return f"quant.lm_head=true, but quant mode {q['mode']} does not quantize an lm_head"
    if q.get("lm_head") and isinstance(cfg["spec"], dict) and cfg["spec"].get("tie_word_embeddings"):
        return "quant.lm_head=true with a tied spec (a quantized lm_head is a tensor of its own: the build unties it)"
    if not isinstance(cfg["dtype"], str):
        return f"dtype={json.dumps(cfg['dtype'])[:40]} is not a string"
    for key in ("target", "runtime"):
        if key in cfg and not isinstance(cfg[key], dict):
            return f"{key}={json.dumps(cfg[key])[:40]} is not an object"
    return _spec_problem(cfg["spec"]) or _layout_problem(cfg)


def _layout_problem(cfg) -> str | None:
    """The mapping must cut this spec: what the build checked (a rewritten engine.json may not)."""
    from .parallel import RankLayout
    from .spec import ModelSpec

    try:
        RankLayout.of(ModelSpec.from_dict(cfg["spec"]), cfg["mapping"], 0)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        return f"mapping does not fit the spec ({e})"
    return None


def read_engine_config(path: Path) -> dict:
    """engine.json, checked: the keys the runtime reads, with their types (one EngineError otherwise)."""
    cfg = _read_json(path)
    problem = _engine_config_problem(cfg)
    if problem:
        raise EngineError(f"{path}: {problem}; {_REBUILD}")
    return cfg


def world_size(config: dict) -> int:
    return config["mapping"]["tp"] * config["mapping"]["pp"]


# ---- the one check -----------------------------------------------------------------------------------
def verify_engine(engine_dir: str | Path, mode: str = "full", *, use_cache: bool = True,
                  own_rank: int | None = None) -> tuple[dict, dict]:
    """Check an engine folder and return (manifest, engine_config), or raise one EngineError line.

    Always: the manifest is well formed, lists engine.json, the rank files rank0..rankN-1 of the mapping
    (N = tp*pp) and every file under tokenizer/, and nothing else; each listed file is a regular file
    reached without symbolic links; engine.json has the keys and types the runtime reads. mode "size"
    adds sizes, "full" sizes and sha256, remembered across runs by a stamp a writer cannot set back
    (DigestCache); use_cache=False re-reads every byte (which also catches silent disk corruption).
    own_rank: a launched rank hashes only its own rank file (sizes of the others), so that N ranks started
    together read the engine once between them, not N times.
    """
    if mode not in VERIFY_MODES:
        raise UserError(f"verify={mode!r}: use one of {', '.join(VERIFY_MODES)}")
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineError(f"engine folder {engine_dir} does not exist; build one with "
                          "`python -m engine_factory model.source=...` and pass the path it prints")
    mpath = engine_dir / MANIFEST_JSON
    if not os.path.lexists(mpath):
        raise EngineError(f"{engine_dir}: no {MANIFEST_JSON}, so this is not a complete engine; "
                          "rebuild it with `python -m engine_factory ...`")
    _regular_file(engine_dir, MANIFEST_JSON)
    manifest = _parse_manifest(mpath)
    files = manifest["files"]
    cache = DigestCache(verify_cache_path() if use_cache else None)
    if ENGINE_JSON not in files:
        raise EngineError(f"{mpath}: does not list {ENGINE_JSON}; {_REBUILD}")
    cpath = _regular_file(engine_dir, ENGINE_JSON)
    _check_file(cpath, files[ENGINE_JSON], mode, cache)  # before it is parsed: a tampered one is never trusted
    config = read_engine_config(cpath)
    n = world_size(config)
    for r in range(n):  # stops at the first one missing: a mapping of 10**9 ranks costs nothing
        if rank_file(r) not in files:
            raise EngineError(f"{mpath}: does not list {rank_file(r)}, a rank file of this engine's mapping (tp="
                              f"{config['mapping']['tp']} pp={config['mapping']['pp']}: rank0..rank{n - 1}); "
                              f"{_REBUILD}")
    expected = {ENGINE_JSON, *(rank_file(r) for r in range(n))}
    for rel in files:
        if rel not in expected and not rel.startswith(TOKENIZER_DIR + "/"):
            raise EngineError(f"{mpath}: lists {rel}, which is not a file of this engine (engine.json, "
                              f"rank0..rank{n - 1}.safetensors, tokenizer/...); {_REBUILD}")
    _check_tokenizer_folder(engine_dir, files)
    others = {rank_file(r) for r in range(n) if r != own_rank} if own_rank is not None and mode == "full" else set()
    for rel in sorted(files):
        if rel != ENGINE_JSON:
            _check_file(_regular_file(engine_dir, rel), files[rel], "size" if rel in others else mode, cache)
    cache.save()
    from .rank_files import check_rank_file  # (torch: the runtime has it imported already)

    for r in range(n):  # headers only: names, shapes and dtypes against the shard plan, before any weight is read
        check_rank_file(engine_dir / rank_file(r), config, r)
    return manifest, config


def manifest_entries(engine_dir: Path) -> dict[str, dict]:
    """sha256 and size of the files a manifest lists: engine.json, the rank files of its mapping, and
    every file under tokenizer/ (refused if any is a link: a load would refuse the engine)."""
    engine_dir = Path(engine_dir)
    config = read_engine_config(engine_dir / ENGINE_JSON)
    rels = [ENGINE_JSON, *(rank_file(r) for r in range(world_size(config)))]
    tdir = engine_dir / TOKENIZER_DIR
    if os.path.lexists(tdir):
        rels += sorted(p.relative_to(engine_dir).as_posix() for p in tdir.rglob("*")
                       if p.is_symlink() or not p.is_dir())
    out = {}
    for rel in rels:
        p = _regular_file(engine_dir, rel)
        out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out
