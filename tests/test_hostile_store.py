"""Hostile and faulty inputs to the build command and the store (issue 8), tried as an adversary would.

The table: (case, command line, expected exit code, words of the one error line). Every row must end with that
exit code, exactly one `error:` line (last, no traceback), nothing written outside the store (the folder around
it is compared before and after) and nothing half-written inside it. Faults that need the file system's help
(a read-only store, a full disk) use mounts where this machine allows them, and in-process fault injection
everywhere. Runtime flags: test_hostile_runtime.py; engine verification: test_hostile_verify.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import (LIMITS, ROOT, assert_one_clear_line, assert_store_clean, build_in_process, engine_path,
                     engines_in, rank_digests, run_module)

pytestmark = pytest.mark.usefixtures("one_thread")

BUILD = ["precision=fp32", "validate.enabled=false", *LIMITS]

# (case, arguments after `python -m engine_factory` ({src}: the tiny LLaMA, {store}: the store), rc, words)
CASES = [
    ("name climbs out of the store", ["model.name=../escaped"], 2, ["model.name='../escaped'", "no '/', no '..'"]),
    ("name is an absolute path", ["model.name=/tmp/ef-escaped"], 2, ["model.name='/tmp/ef-escaped'", "letters"]),
    ("name is hidden", ["model.name=.hidden"], 2, ["model.name='.hidden'"]),
    ("name with a separator", ["model.name=a/b"], 2, ["model.name='a/b'"]),
    ("name with a space", ["model.name=a b"], 2, ["model.name='a b'"]),
    ("recipe name climbs out", ["recipe=../../etc/passwd"], 2, ["recipe=../../etc/passwd", "no such recipe"]),
    ("sweep job folder climbs out", ["-m", "precision=fp32,fp16", "hydra.sweep.subdir=../../out"], 2,
     ["hydra.sweep.subdir='../../out'"]),
    ("run folder climbs out", ["hydra.run.dir={store}/../../hydra-out"], 2, ["hydra.run.dir=", "no '..'"]),
    ("sweep point fails its model check", ["-m", "parallel.tp=1,3"], 2,
     ["parallel.tp=3", "num_attention_heads=8"]),
    ("sweep's last point fails its model check", ["-m", "precision=fp32,fp16", "parallel.tp=1,16"], 2,
     ["parallel.tp=16", "num_attention_heads=8"]),
    ("verify mode unknown", ["verify=sometimes"], 2, ["verify=sometimes", "full", "size"]),
]


def _listing(folder: Path, store: Path) -> set[str]:
    """Everything under `folder` except the store itself."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if store not in (p, *p.parents)}


@pytest.mark.parametrize("case, args, rc, words", CASES, ids=[c[0] for c in CASES])
def test_hostile_build_command(case, args, rc, words, cli, tmp_path, tiny_llama):
    store = tmp_path / "area" / "store"
    store.parent.mkdir()
    before = _listing(tmp_path, store)
    argv = [a.format(src=tiny_llama, store=store) for a in args]
    result = cli(f"model.source={tiny_llama}", f"store={store}", *BUILD, *argv)
    assert result[0] == rc, result[2][-2000:]
    assert_one_clear_line(result, *words)
    assert _listing(tmp_path, store) == before, "something was written outside the store"
    assert not list(Path("/tmp").glob("ef-escaped*"))
    assert not engines_in(store)
    assert_store_clean(store)


# ---- a damaged engine in the store ---------------------------------------------------------------------
@pytest.fixture
def built(cli, tmp_path, tiny_llama):
    store = tmp_path / "store"
    engine = engine_path(cli(f"model.source={tiny_llama}", f"store={store}", *BUILD))
    return store, engine


@pytest.mark.parametrize("verify, damage", [
    ("size", lambda f: f.write_bytes(f.read_bytes()[:-10])),  # truncated
    ("full", lambda f: f.write_bytes(f.read_bytes()[:-4] + b"\0\1\2\3")),  # same size, other bytes
])
def test_cache_hit_over_a_damaged_engine_rebuilds_it_and_says_so(built, cli, tiny_llama, verify, damage):
    store, engine = built
    good = rank_digests(engine)
    rank0 = engine / "rank0.safetensors"
    stat = rank0.stat()
    damage(rank0)
    os.utime(rank0, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime put back, as `touch -r` would
    rc, out, err = cli(f"model.source={tiny_llama}", f"store={store}", *BUILD, f"verify={verify}")
    assert rc == 0, err[-2000:]
    assert "damaged, rebuilding" in err and "rank0.safetensors" in err
    assert engine_path((rc, out, err)) == engine
    assert rank_digests(engine) == good
    assert_store_clean(store)


def test_cache_hit_checks_sizes_and_does_not_rebuild_an_intact_engine(built, cli, tiny_llama):
    store, engine = built
    before = (engine / "rank0.safetensors").stat().st_ino
    rc, out, err = cli(f"model.source={tiny_llama}", f"store={store}", *BUILD, "verify=full")
    assert rc == 0 and "cache hit" in err and "rebuilding" not in err
    assert (engine / "rank0.safetensors").stat().st_ino == before


# ---- a read-only store -----------------------------------------------------------------------------------
@pytest.fixture
def read_only_view(built, tmp_path):
    """The built store seen through a read-only bind mount (root), or made read-only with chmod (others)."""
    store, engine = built
    view = tmp_path / "ro"
    view.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(view)], capture_output=True).returncode:
            pytest.skip("cannot mount a read-only view of the store here (no mount permission in this container)")
        yield view, view / engine.name
        subprocess.run(["umount", str(view)], capture_output=True)
    else:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        yield store, engine
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_read_only_store_cache_hit_works_and_a_new_build_fails_in_one_line(read_only_view, cli, run_engine,
                                                                          tiny_llama):
    store, engine = read_only_view
    rc, out, err = cli(f"model.source={tiny_llama}", f"store={store}", *BUILD)
    assert rc == 0, err[-2000:]
    assert engine_path((rc, out, err)) == engine
    rc, out, err = run_engine("--engine_dir", engine, "--input_ids", "1,5,9", "--max_output_len", "4")
    assert rc == 0, err[-2000:]
    assert_one_clear_line(cli(f"model.source={tiny_llama}", f"store={store}", *BUILD, "precision=fp16"),
                          f"store={store}", "read-only", "writable folder")


# ---- a full disk -------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 600 kB file system (tmpfs), where this machine lets the tests mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission); the in-process "
                    "ENOSPC test covers the same path")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_with_the_size_needed(small_disk, cli, tiny_llama):
    # the tiny LLaMA is ~0.41 MB in fp32: the free space passes the check before work and its converted
    # checkpoint fits, then the engine's rank file runs out of room
    store = small_disk / "store"
    assert_one_clear_line(cli(f"model.source={tiny_llama}", f"store={store}", *BUILD),
                          "no space left", str(store), "free; the engine needs about")
    assert not engines_in(store)
    assert_store_clean(store)


def test_engine_larger_than_the_free_space_stops_before_any_work(small_disk, cli):
    store = small_disk / "store"
    assert_one_clear_line(cli("recipe=llama7b_fp16_dummy", f"store={store}", "validate.enabled=false"),
                          "no space left", "needs about 13.", "store=")
    assert_store_clean(store)


def test_enospc_mid_build_is_one_user_error_and_the_store_stays_clean(tiny_llama, tmp_path, monkeypatch):
    import errno

    from engine_factory.stages import build as build_stage
    from runtime.errors import UserError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(build_stage, "write_streaming", full)
    store = tmp_path / "store"
    with pytest.raises(UserError, match=r"no space left .* needs about 0\.4\d MB") as e:
        build_in_process(tiny_llama, store, "precision=fp32", "validate.enabled=false")
    assert "\n" not in str(e.value)
    assert not engines_in(store)
    assert_store_clean(store)


# ---- a killed build --------------------------------------------------------------------------------------
def test_staging_folders_of_a_killed_build_are_removed_by_the_next_build(cli, tmp_path):
    """Kill a build while it writes (SIGKILL: no cleanup runs), then build again in the same store."""
    store = tmp_path / "store"
    # a dummy LLaMA big enough (~100 MB in fp32) to catch the build while its staging folder exists
    big = ["model.source=dummy", "model.name=big", "precision=fp32", "validate.enabled=false", *LIMITS,
           "+model.config={architectures:[LlamaForCausalLM],model_type:llama,vocab_size:512,hidden_size:512,"
           "intermediate_size:1408,num_hidden_layers:8,num_attention_heads:8,num_key_value_heads:8,"
           "max_position_embeddings:256}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "engine_factory", f"store={store}", *big], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list(store.glob(".tmp-*/rank0.safetensors")):
        time.sleep(0.01)
    if p.poll() is not None:
        pytest.fail("the build ended before its staging folder could be caught")
    p.send_signal(signal.SIGKILL)
    p.wait()
    stale = list(store.glob(".tmp-*"))
    assert stale, "the killed build left no staging folder (nothing to clean up)"
    # and one left in the convert cache, as a build killed while converting leaves it
    (store / ".cache" / "convert" / ".tmp-abc-0000").mkdir(parents=True)
    rc, out, err = cli(f"store={store}", *big[:-1], big[-1].replace("num_hidden_layers:8", "num_hidden_layers:1"))
    assert rc == 0, err[-2000:]
    assert "left by a build that did not finish" in err
    assert_store_clean(store)


def test_a_live_staging_folder_is_kept(tmp_path):
    """The cleanup takes only folders whose lock is free: one a running build holds stays."""
    from engine_factory.store import Store

    store = Store(tmp_path / "store")
    store.prepare("testing")
    with store.staging(store.root / "engine-x") as live:
        (live / "part").write_text("in progress")
        other = Store(store.root)
        assert other.remove_stale_staging() == []
        assert live.is_dir()
    assert (store.root / "engine-x" / "part").is_file()


# ---- concurrent builds -------------------------------------------------------------------------------------
def test_concurrent_builds_into_one_store_give_one_engine_each(tmp_path, tiny_llama):
    """Four builds of one recipe and two of another, at once: every command succeeds, one engine per recipe,
    the same bytes as a build done alone."""
    store = tmp_path / "store"
    fp32 = [f"model.source={tiny_llama}", f"store={store}", *BUILD]
    fp16 = [*fp32, "precision=fp16"]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda args: run_module("engine_factory", *args, cwd=tmp_path, timeout=600),
                                [fp32] * 4 + [fp16] * 2))
    paths = [engine_path(r) for r in results]
    assert len(set(paths[:4])) == 1 and len(set(paths[4:])) == 1 and paths[0] != paths[4]
    assert sorted(engines_in(store)) == sorted({paths[0], paths[4]})
    assert_store_clean(store)
    alone = tmp_path / "alone"
    for args, path in ((fp32, paths[0]), (fp16, paths[4])):
        again = engine_path(run_module("engine_factory", *args[:1], f"store={alone}", *args[2:], cwd=tmp_path))
        assert again.name == path.name and rank_digests(again) == rank_digests(path)
