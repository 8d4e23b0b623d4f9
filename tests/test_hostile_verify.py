"""Hostile and faulty engine folders: every way found to fool or crash the engine check (runtime.format
verify_engine) ends, through `python -m runtime.run` and `python -m runtime.verify`, in exit code 2 and
one `error:` line naming the file, never a traceback; a good engine verifies, loads, and is not re-hashed
on its second load while its files keep their stamps.

Each row damages a copy of a good engine. Rows that change engine.json or a tokenizer file and must reach
the parser write the manifest entry to match (as a builder bug, or someone rewriting the manifest, would):
the manifest is not a signature, only the check of what it lists."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import runtime.format as fmt
from helpers import assert_one_clear_line, build_in_process, run_module, sha256
from runtime.engine import Engine
from runtime.run import main as run_main
from runtime.verify import main as verify_main

pytestmark = pytest.mark.usefixtures("one_thread")

RANK0 = "rank0.safetensors"


@pytest.fixture(scope="module")
def llama_engine(tmp_path_factory, tiny_llama):
    """A good fp32 engine of the tiny LLaMA without a tokenizer; rows damage copies of it."""
    return build_in_process(tiny_llama, tmp_path_factory.mktemp("verify-store"), "precision=fp32",
                            "validate.enabled=false")


@pytest.fixture(scope="module")
def gpt2_engine(tmp_path_factory, tiny_gpt2, shared):
    """A good fp32 engine of the tiny GPT-2 with the real GPT-2 tokenizer in tokenizer/."""
    if not (shared / "tokenizers" / "gpt2").is_dir():
        pytest.skip(f"{shared / 'tokenizers' / 'gpt2'} is absent (set EF_SHARED_DIR to the shared data folder)")
    engine = build_in_process(tiny_gpt2, tmp_path_factory.mktemp("verify-store-tok"), "precision=fp32",
                              "validate.enabled=false")
    assert (engine / "tokenizer" / "tokenizer_config.json").is_file()
    return engine


# ---- damage helpers ------------------------------------------------------------------------------------
def _manifest(e: Path) -> dict:
    return json.loads((e / "manifest.json").read_text())


def _write_manifest(e: Path, obj) -> None:
    """obj: the manifest's bytes, its text, or an object written as JSON."""
    data = obj if isinstance(obj, bytes) else (obj if isinstance(obj, str) else json.dumps(obj)).encode()
    (e / "manifest.json").write_bytes(data)


def _edit_files(e: Path, fn) -> Path:
    m = _manifest(e)
    fn(m["files"])
    _write_manifest(e, m)
    return e / "manifest.json"


def _rewrite(e: Path, rel: str, data: bytes) -> Path:
    """Write e/rel and make the manifest agree with it."""
    (e / rel).write_bytes(data)
    _edit_files(e, lambda f: f.__setitem__(rel, {"sha256": sha256(e / rel), "size": len(data)}))
    return e / rel


def _engine_json(e: Path, fn) -> Path:
    """engine.json changed by fn(config) (or replaced by what fn returns), the manifest agreeing."""
    cfg = json.loads((e / "engine.json").read_text())
    out = fn(cfg)
    return _rewrite(e, "engine.json", json.dumps(cfg if out is None else out).encode())


def _flip_in_place(path: Path) -> None:
    """One byte changed in the middle, same size, and atime/mtime set back (what `touch -r` does)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def touch_r_replay(e):
    fmt.verify_engine(e, "full")  # remembered as verified (the cache that runtime.run reads too)
    _flip_in_place(e / RANK0)
    return [str(e / RANK0), "sha256"]


def cp_p_replaced(e):
    fmt.verify_engine(e, "full")
    bad = e.parent / "tampered.bin"
    data = bytearray((e / RANK0).read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    shutil.copystat(e / RANK0, bad)  # cp -p: same size and mtime, a new inode
    os.replace(bad, e / RANK0)
    return [str(e / RANK0), "sha256"]


def rank_symlink_outside(e):
    outside = e.parent / "outside" / RANK0
    outside.parent.mkdir()
    shutil.move(e / RANK0, outside)  # same bytes: only the link gives it away
    (e / RANK0).symlink_to(outside)
    return [str(e / RANK0), "symbolic link"]


def engine_json_symlink(e):
    outside = e.parent / "engine.json"
    shutil.copy(e / "engine.json", outside)
    (e / "engine.json").unlink()
    (e / "engine.json").symlink_to(outside)
    return [str(e / "engine.json"), "symbolic link"]


def manifest_symlink(e):
    outside = e.parent / "manifest.json"
    shutil.move(e / "manifest.json", outside)
    (e / "manifest.json").symlink_to(outside)
    return [str(e / "manifest.json"), "symbolic link"]


def tokenizer_dir_symlink(e):
    outside = e.parent / "tok-outside"
    shutil.move(e / "tokenizer", outside)
    (e / "tokenizer").symlink_to(outside, target_is_directory=True)
    return [str(e / "tokenizer"), "symbolic link"]


def tokenizer_file_symlink(e):
    """A listed tokenizer file replaced by a link to a copy of itself outside."""
    rel = "tokenizer/tokenizer.json"
    outside = e.parent / "tokenizer.json"
    shutil.move(e / rel, outside)
    (e / rel).symlink_to(outside)
    return [str(e / rel), "symbolic link"]


def drop_in(rel: str, text: str):
    def damage(e):
        (e / rel).parent.mkdir(parents=True, exist_ok=True)
        (e / rel).write_text(text)
        return [str(e / rel), "not listed"]
    return damage


def tokenizer_link_unlisted(e):
    (e / "tokenizer" / "extra.json").symlink_to(e / "tokenizer" / "tokenizer.json")
    return [str(e / "tokenizer" / "extra.json"), "not listed"]


def tokenizer_dir_without_entries(e):
    """A whole tokenizer/ dropped into an engine built without one."""
    (e / "tokenizer").mkdir()
    (e / "tokenizer" / "tokenizer_config.json").write_text("{}")
    return [str(e / "tokenizer" / "tokenizer_config.json"), "not listed"]


def listed_tokenizer_file_missing(e):
    (e / "tokenizer" / "tokenizer.json").unlink()
    return [str(e / "tokenizer" / "tokenizer.json"), "missing"]


def tokenizer_file_tampered(e):
    p = e / "tokenizer" / "tokenizer.json"
    _flip_in_place(p)  # same size: only sha256 tells
    return [str(p), "sha256"]


def manifest_text(text: str, *words: str):
    def damage(e):
        _write_manifest(e, text)
        return [str(e / "manifest.json"), *words]
    return damage


def manifest_files(fn, *words: str):
    def damage(e):
        return [str(_edit_files(e, fn)), *words]
    return damage


def entry(rel: str, value):
    return lambda files: files.__setitem__(rel, value)


def drop_key(key: str):
    return lambda files: files.pop(key)


def without(field: str):
    return lambda files: files[RANK0].pop(field)


def config_edit(fn, *words: str):
    def damage(e):
        return [str(_engine_json(e, fn)), *words]
    return damage


def config_bytes(data: bytes, *words: str):
    def damage(e):
        return [str(_rewrite(e, "engine.json", data)), *words]
    return damage


def pop(*path):
    def fn(cfg):
        d = cfg
        for k in path[:-1]:
            d = d[k]
        d.pop(path[-1])
    return fn


def put(value, *path):
    def fn(cfg):
        d = cfg
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def tampered_engine_json(e):
    p = e / "engine.json"
    p.write_text(p.read_text().replace('"max_batch_size": 4', '"max_batch_size": 9'))
    return [str(p), "sha256"]


def truncated_rank(e):
    (e / RANK0).write_bytes((e / RANK0).read_bytes()[:-1])
    return [str(e / RANK0), "size"]


def rank_is_a_folder(e):
    (e / RANK0).unlink()
    (e / RANK0).mkdir()
    return [str(e / RANK0), "not a regular file"]


def mapping_of(tp: int):
    """engine.json says tp (the manifest agreeing for it), but only rank0 is listed."""
    def damage(e):
        _engine_json(e, lambda c: c["mapping"].update(tp=tp, world_size=tp))
        return [str(e / "manifest.json"), "rank1.safetensors", f"tp={tp} "]
    return damage


def rank_tensors(fn, *words: str):
    """rank0.safetensors rewritten with fn(tensors) (the manifest agreeing): a rank file of another build."""
    def damage(e):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(e / RANK0))
        fn(tensors)
        save_file(tensors, str(e / RANK0), metadata={"format": "engine-factory"})
        return [str(_rewrite(e, RANK0, (e / RANK0).read_bytes())), *words]
    return damage


def _shape_words(name: str, found, want, dtype: str = "F32") -> list[str]:
    return [name, f"is {list(found)} {dtype}", f"{list(want)} {dtype}"]


def spec_wider_mlp(e):
    """A well-typed engine.json whose spec disagrees with the rank file: intermediate_size + 8."""
    cfg = json.loads((e / "engine.json").read_text())
    i, h = cfg["spec"]["intermediate_size"], cfg["spec"]["hidden_size"]
    _engine_json(e, put(i + 8, "spec", "intermediate_size"))
    return [str(e / RANK0), *_shape_words("layers.0.mlp.up.weight", (2 * i, h), (2 * (i + 8), h)),
            "rank 0 of tp=1 pp=1"]


def _narrow_embed(t):
    t["embed.weight"] = t["embed.weight"][:-1].clone()


def _extra(t):
    t["layers.99.attn.o.weight"] = t["final_norm.weight"].clone()


def _half(t):
    t["final_norm.weight"] = t["final_norm.weight"].half()


SHA = "0" * 64
ROWS = [
    # (case id, engine, damage)
    ("touch-r-replay", "llama", touch_r_replay),
    ("cp-p-replaced", "llama", cp_p_replaced),
    ("truncated-rank", "llama", truncated_rank),
    ("tampered-engine-json", "llama", tampered_engine_json),
    ("empty-manifest", "llama", manifest_text('{"files": {}}', "rebuild")),
    ("empty-manifest-v1", "llama", manifest_text('{"format_version": 1, "files": {}}', "does not list engine.json")),
    ("manifest-missing-rank", "llama", manifest_files(drop_key(RANK0), "does not list rank0.safetensors")),
    ("manifest-missing-engine-json", "llama", manifest_files(drop_key("engine.json"), "does not list engine.json")),
    ("mapping-rank-unlisted", "llama", mapping_of(2)),
    ("manifest-extra-rank", "llama", manifest_files(entry("rank1.safetensors", {"size": 1, "sha256": SHA}),
                                                     "rank1.safetensors", "not a file of this engine")),
    ("manifest-extra-file", "llama", manifest_files(entry("notes.txt", {"size": 1, "sha256": SHA}), "notes.txt")),
    ("manifest-lists-itself", "llama", manifest_files(entry("manifest.json", {"size": 1, "sha256": SHA}),
                                                       "never part")),
    ("dotdot-path", "llama", manifest_files(entry("../outside.txt", {"size": 1, "sha256": SHA}),
                                             "'../outside.txt'", "plain relative path")),
    ("dotdot-inside-path", "llama", manifest_files(entry("tokenizer/../rank0.safetensors", {"size": 1, "sha256": SHA}),
                                                    "plain relative path")),
    ("absolute-path", "llama", manifest_files(entry("/etc/hostname", {"size": 1, "sha256": SHA}),
                                               "'/etc/hostname'", "plain relative path")),
    ("dot-path", "llama", manifest_files(entry("./engine.json", {"size": 1, "sha256": SHA}), "plain relative path")),
    ("rank-symlink-outside", "llama", rank_symlink_outside),
    ("engine-json-symlink", "llama", engine_json_symlink),
    ("manifest-symlink", "llama", manifest_symlink),
    ("rank-is-a-folder", "llama", rank_is_a_folder),
    ("manifest-not-json", "llama", manifest_text('{"files": ', "not valid JSON")),
    ("manifest-not-utf8", "llama", manifest_text(b'{"files": "\xff"}', "not valid JSON")),
    ("manifest-null", "llama", manifest_text("null", "a null")),
    ("manifest-list", "llama", manifest_text("[]", "a list")),
    ("manifest-deep", "llama", manifest_text("[" * 100000, "not valid JSON")),
    ("manifest-duplicate-key", "llama", manifest_text('{"format_version": 1, "files": {}, "files": {}}', "duplicate")),
    ("files-a-list", "llama", manifest_text('{"format_version": 1, "files": []}', '"files" is list')),
    ("files-null", "llama", manifest_text('{"format_version": 1, "files": null}', '"files" is null')),
    ("manifest-format-0", "llama", manifest_text('{"format_version": 0, "files": {}}', "engine format 0")),
    ("manifest-no-format", "llama", manifest_text('{"files": {"engine.json": 1}}', "lacks format_version")),
    ("entry-without-size", "llama", manifest_files(without("size"), RANK0, "size")),
    ("entry-without-sha256", "llama", manifest_files(without("sha256"), RANK0, "sha256")),
    ("size-a-string", "llama", manifest_files(lambda f: f[RANK0].update(size="12"), RANK0)),
    ("size-a-bool", "llama", manifest_files(lambda f: f[RANK0].update(size=True), RANK0)),
    ("size-negative", "llama", manifest_files(lambda f: f[RANK0].update(size=-1), RANK0)),
    ("sha256-short", "llama", manifest_files(lambda f: f[RANK0].update(sha256="abc"), RANK0)),
    ("entry-a-string", "llama", manifest_files(entry(RANK0, "ok"), RANK0)),
    ("engine-json-not-json", "llama", config_bytes(b"{nope", "not valid JSON")),
    ("engine-json-null", "llama", config_bytes(b"null", "a null, not an object")),
    ("engine-json-list", "llama", config_bytes(b"[1, 2]", "a list, not an object")),
    ("engine-json-string", "llama", config_bytes(b'"engine"', "a str, not an object")),
    ("no-spec", "llama", config_edit(pop("spec"), "lacks spec")),
    ("no-mapping", "llama", config_edit(pop("mapping"), "lacks mapping")),
    ("no-limits", "llama", config_edit(pop("limits"), "lacks limits")),
    ("no-quant", "llama", config_edit(pop("quant"), "lacks quant")),
    ("no-format-version", "llama", config_edit(pop("format_version"), "lacks format_version")),
    ("format-version-99", "llama", config_edit(put(99, "format_version"), "engine format 99")),
    ("spec-unknown-field", "llama", config_edit(put(1, "spec", "n_experts"), "unknown fields ['n_experts']")),
    ("spec-missing-field", "llama", config_edit(pop("spec", "hidden_size"), "lacks fields ['hidden_size']")),
    ("spec-wrong-type", "llama", config_edit(put("64", "spec", "hidden_size"), "spec.hidden_size")),
    ("spec-zero-heads", "llama", config_edit(put(0, "spec", "num_heads"), "spec.num_heads")),
    ("spec-eos-strings", "llama", config_edit(put(["2"], "spec", "eos_token_ids"), "spec.eos_token_ids")),
    ("spec-nan-eps", "llama", config_edit(put(float("nan"), "spec", "norm_eps"), "spec.norm_eps=NaN")),
    ("mapping-huge-tp", "llama", config_edit(lambda c: c["mapping"].update(tp=10**9, world_size=10**9),
                                             "mapping does not fit the spec", "tp=1000000000")),
    ("spec-a-list", "llama", config_edit(put([], "spec"), '"spec" is list')),
    ("mapping-tp-zero", "llama", config_edit(put(0, "mapping", "tp"), "mapping=")),
    ("mapping-world-size", "llama", config_edit(put(3, "mapping", "world_size"), "world_size")),
    ("limits-no-seq-len", "llama", config_edit(pop("limits", "max_seq_len"), "limits=", "max_seq_len")),
    ("quant-a-string", "llama", config_edit(put("none", "quant"), "quant=")),
    ("quant-unknown-mode", "llama", config_edit(put("int3", "quant", "mode"), "int3", "quant mode")),
    ("target-a-string", "llama", config_edit(put("cpu", "target"), "target=")),
    ("spec-disagrees-with-rank-file", "llama", spec_wider_mlp),
    ("rank-tensor-shape", "llama", rank_tensors(_narrow_embed, RANK0, "embed.weight", "is [", "rank 0 of tp=1")),
    ("rank-tensor-missing", "llama", rank_tensors(lambda t: t.pop("final_norm.weight"), RANK0,
                                                  "lacks tensor final_norm.weight")),
    ("rank-tensor-extra", "llama", rank_tensors(_extra, RANK0, "holds tensor layers.99.attn.o.weight",
                                                "not a tensor of rank 0")),
    ("rank-tensor-dtype", "llama", rank_tensors(_half, RANK0, "final_norm.weight", "F16", "F32")),
    ("rank-header-garbage", "llama", lambda e: [str(_rewrite(e, RANK0, b"\xff" * 8 + b"{}")),
                                                "not a readable rank file"]),
    ("tokenizer-dir-dropped-in", "llama", tokenizer_dir_without_entries),
    ("added-tokens-dropped-in", "gpt2", drop_in("tokenizer/added_tokens.json", '{"zzqx": 50257}')),
    ("chat-template-dropped-in", "gpt2", drop_in("tokenizer/chat_template.jinja", "{{ messages }}")),
    ("hidden-file-dropped-in", "gpt2", drop_in("tokenizer/.hidden", "x")),
    ("nested-file-dropped-in", "gpt2", drop_in("tokenizer/sub/special_tokens_map.json", "{}")),
    ("tokenizer-link-unlisted", "gpt2", tokenizer_link_unlisted),
    ("tokenizer-dir-symlink", "gpt2", tokenizer_dir_symlink),
    ("tokenizer-file-symlink", "gpt2", tokenizer_file_symlink),
    ("tokenizer-file-missing", "gpt2", listed_tokenizer_file_missing),
    ("tokenizer-file-tampered", "gpt2", tokenizer_file_tampered),
]


@pytest.fixture
def damaged(request, tmp_path):
    """damaged(engine kind, damage) -> (copy of that engine with the damage done, words of the error line)."""
    def make(kind: str, damage):
        good = request.getfixturevalue(f"{kind}_engine")
        copy = shutil.copytree(good, tmp_path / "engines" / good.name, symlinks=True)
        return copy, damage(copy)
    return make


def _in_process(main, capsys, *argv) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of a command line's main, run in this process as `python -m` runs it (an exception
    other than the one-line exit fails the test as a traceback would)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case,kind,damage", ROWS, ids=[r[0] for r in ROWS])
def test_damaged_engine_is_refused_with_one_line(case, kind, damage, damaged, capsys):
    """Every row through runtime.run's and runtime.verify's main in this process (a subprocess costs ~4 s of
    interpreter and torch start-up per run on CI's 2 cores; the rows in CLI_CASES run as subprocesses too)."""
    engine, words = damaged(kind, damage)
    for main, args in ((run_main, ["--engine_dir", engine, "--input_ids", "1,2,3", "--device", "cpu"]),
                       (verify_main, [engine])):
        result = _in_process(main, capsys, *args)
        assert result[0] == 2, result
        assert_one_clear_line(result, *words)


def test_every_row_case_is_unique_and_every_spec_field_type_is_checked():
    assert len({r[0] for r in ROWS}) == len(ROWS)
    assert set(CLI_CASES) <= {r[0] for r in ROWS}
    import dataclasses

    from runtime.spec import ModelSpec

    assert {str(f.type) for f in dataclasses.fields(ModelSpec)} <= set(fmt._SPEC_TYPES)


# ---- through the command lines, as a user runs them -------------------------------------------------------
# the cases as a user meets them: python -m runtime.run for each, python -m runtime.verify for two
CLI_CASES = ["touch-r-replay", "chat-template-dropped-in", "empty-manifest", "manifest-null", "no-spec",
             "rank-symlink-outside"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_python_m_commands_refuse(case, damaged, run_engine, tmp_path):
    (_, kind, damage), = [r for r in ROWS if r[0] == case]
    engine, words = damaged(kind, damage)
    result = run_engine("--engine_dir", engine, "--input_ids", "1,2,3", "--device", "cpu")
    assert result[0] == 2, result
    assert_one_clear_line(result, *words)
    if CLI_CASES.index(case) < 2:
        result = run_module("runtime.verify", engine, cwd=tmp_path)
        assert result[0] == 2, result
        assert_one_clear_line(result, *words)


def test_python_m_runtime_verify_accepts_a_good_engine(llama_engine, tmp_path):
    for mode, what in (("full", "sha256 checked"), ("size", "sizes checked")):
        rc, out, err = run_module("runtime.verify", llama_engine, "--mode", mode, cwd=tmp_path)
        assert rc == 0, err
        assert out.strip() == f"ok: {llama_engine} (2 files, {what})"


# ---- a good engine --------------------------------------------------------------------------------------
@pytest.fixture
def count_hashes(monkeypatch, tmp_path):
    """A fresh cache of verified files; the list of files that sha256_file reads from here on."""
    monkeypatch.setenv("EF_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[Path] = []
    real = fmt.sha256_file

    def counting(path, *a, **k):
        seen.append(Path(path))
        return real(path, *a, **k)
    monkeypatch.setattr(fmt, "sha256_file", counting)
    return seen


def test_good_engine_verifies_loads_and_is_not_rehashed(llama_engine, tmp_path, count_hashes):
    engine = shutil.copytree(llama_engine, tmp_path / llama_engine.name)
    manifest, config = fmt.verify_engine(engine, "full")
    assert set(manifest["files"]) == {"engine.json", RANK0}
    assert config == json.loads((engine / "engine.json").read_text())
    assert sorted(p.name for p in count_hashes) == ["engine.json", RANK0]
    count_hashes.clear()
    first = Engine.load(engine, device="cpu").generate([[1, 2, 3]], max_new_tokens=4)[0].output_ids
    assert count_hashes == []  # the stamps are unchanged: nothing read twice
    fmt.verify_engine(engine, "full", use_cache=False)  # by hand: every byte again
    assert sorted(p.name for p in count_hashes) == ["engine.json", RANK0]
    count_hashes.clear()
    # cp -p of the same bytes to the same path: a new inode, so hashed again (and still good)
    keep = tmp_path / "rank0.copy"
    shutil.copy2(engine / RANK0, keep)
    os.replace(keep, engine / RANK0)
    again = Engine.load(engine, device="cpu").generate([[1, 2, 3]], max_new_tokens=4)[0].output_ids
    assert [p.name for p in count_hashes] == [RANK0]
    assert again == first


def test_stamp_holds_what_touch_r_cannot_set_back(tmp_path):
    """On Linux a write moves ctime and nothing sets it back: that is why the stamp has it (and the inode)."""
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 64)
    before = fmt._stamp(p.stat())
    _flip_in_place(p)
    after = fmt._stamp(p.stat())
    assert before[:4] == after[:4]  # device, inode, size, mtime: what a touch -r replay keeps
    assert after != before


def test_digest_cache_rehashes_a_rewritten_source_file(tmp_path, monkeypatch):
    """engine_factory's source digests use the same cache (one implementation)."""
    from engine_factory.sources.digests import file_digests

    class FakeStore:
        root = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    assert file_digests([src / "config.json"], src, FakeStore) == {"config.json": sha256(src / "config.json")}
    _flip_in_place(src / "config.json")
    assert file_digests([src / "config.json"], src, FakeStore) == {"config.json": sha256(src / "config.json")}


def test_engine_with_tokenizer_verifies_and_encodes(gpt2_engine, gpt2_tokenizer, tmp_path):
    manifest, _ = fmt.verify_engine(gpt2_engine, "full")
    listed = {rel for rel in manifest["files"] if rel.startswith("tokenizer/")}
    on_disk = {p.relative_to(gpt2_engine).as_posix() for p in (gpt2_engine / "tokenizer").rglob("*") if p.is_file()}
    assert listed == on_disk and listed
    engine = Engine.load(gpt2_engine, device="cpu")
    text = "The capital of France is"
    assert engine.encode(text) == gpt2_tokenizer(text)["input_ids"]


def test_user_tokenizer_dir_is_outside_the_engine_and_exempt(llama_engine, gpt2_engine, tmp_path):
    """--tokenizer_dir is the user's own folder: files in it are not the manifest's business."""
    tok = shutil.copytree(gpt2_engine / "tokenizer", tmp_path / "my-tokenizer")
    (tok / "notes.txt").write_text("mine")
    engine = Engine.load(llama_engine, device="cpu", tokenizer_dir=tok)
    assert engine.tokenizer is not None


def test_verify_mode_is_checked(llama_engine):
    from runtime.errors import UserError

    with pytest.raises(UserError, match="verify='sha1'"):
        fmt.verify_engine(llama_engine, "sha1")
