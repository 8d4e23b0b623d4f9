"""Multi-rank engines launched three ways (mpirun, torchrun, no launcher) give the tp1 engine's tokens;
a world size that does not fit is one line; a rank that dies ends the others with one line, quickly.

CPU, gloo. One tp1, one tp2 and one tp2 x pp2 engine of the tiny LLaMA (GQA: 8 heads, 2 KV heads) are
built once; every multi-process run costs interpreter start + torch import per rank, so runs are few.
mpirun as root needs OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1 (set below); --oversubscribe lets 3-4 ranks
share a 2-core machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, assert_one_clear_line, build_in_process, run_module
from runtime.errors import UserError

NEW_TOKENS = 32
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="mpirun is absent (make install puts Open MPI on Debian machines)")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 40)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_llama):
    """tp1, tp2 and tp2 x pp2 fp32 engines of the same checkpoint."""
    store = tmp_path_factory.mktemp("launch-store")
    build = lambda *o: build_in_process(tiny_llama, store, "precision=fp32", "validate.enabled=false", *o)
    return {"tp1": build(), "tp2": build("parallel.tp=2"), "tp2pp2": build("parallel.tp=2", "parallel.pp=2")}


@pytest.fixture(scope="module")
def reference(engines):
    """The tp1 engine's greedy tokens for the prompts (EOS is an ordinary token here)."""
    from runtime.engine import Engine

    eng = Engine.load(engines["tp1"], device="cpu")
    return [g.output_ids for g in eng.generate(_prompts(), max_new_tokens=NEW_TOKENS, ignore_eos=True)]


def _run_args(engine_dir: Path) -> list[str]:
    args = ["--engine_dir", str(engine_dir), "--device", "cpu", "--json", "--ignore_eos",
            "--max_output_len", str(NEW_TOKENS)]
    for p in _prompts():
        args += ["--input_ids", ",".join(map(str, p))]
    return args


def _launch(launcher: str, n: int, engine_dir: Path, timeout: float = 240) -> tuple[int, str, str]:
    """python -m runtime.run under a launcher of n processes ("none": plain python)."""
    if launcher == "none":
        return run_module("runtime.run", *_run_args(engine_dir), timeout=timeout)
    if launcher == "mpirun":
        cmd = ["mpirun", "--oversubscribe", "-n", str(n), sys.executable, "-m", "runtime.run"]
    else:
        # --standalone: a free rendezvous port, not 29500 (other test runs may share this machine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "runtime.run"]
    env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd + _run_args(engine_dir), capture_output=True, cwd=str(ROOT), env=env, timeout=timeout)
    return p.returncode, p.stdout.decode(), p.stderr.decode(errors="replace")


def _output_ids(result) -> list[list[int]]:
    rc, out, err = result
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == len(_prompts()), f"only rank 0 prints, once per prompt:\n{out[-2000:]}"
    assert [r["prompt_ids"] for r in rows] == _prompts()
    return [r["output_ids"] for r in rows]


@pytest.mark.parametrize("launcher, engine, n", [
    ("none", "tp2", 2),
    pytest.param("mpirun", "tp2", 2, marks=needs_mpirun),
    ("torchrun", "tp2", 2),
    pytest.param("mpirun", "tp2pp2", 4, marks=needs_mpirun),
    pytest.param("none", "tp2pp2", 4, marks=pytest.mark.slow),
])
def test_launchers_give_tp1_tokens(engines, reference, launcher, engine, n):
    assert _output_ids(_launch(launcher, n, engines[engine])) == reference


@needs_mpirun
def test_world_size_that_does_not_fit_is_one_line(engines):
    rc, out, err = _launch("mpirun", 3, engines["tp2"], timeout=120)
    assert rc != 0 and not out.strip()
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"only rank 0 prints the error:\n{err[-3000:]}"
    for fragment in ("built for 2 ranks", "started 3 processes", "`mpirun -n 2 python -m runtime.run",
                     "no launcher"):
        assert fragment in errors[0], errors[0]


def test_engine_load_drives_local_ranks(engines, reference, one_thread):
    """Engine.load of a tp2 engine in this process: rank 0 drives a spawned worker; tokens and logits
    of tp1; close() stops the worker."""
    from runtime.engine import Engine

    tp1 = Engine.load(engines["tp1"], device="cpu")
    eng = Engine.load(engines["tp2"], device="cpu")
    try:
        assert (eng.ranks.rank, eng.ranks.size, eng.ranks.backend) == (0, 2, "gloo")
        worker = eng.ranks.procs[0]
        assert worker.poll() is None
        gens = eng.generate(_prompts(), max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [g.output_ids for g in gens] == reference
        for ours, want in zip(eng.score(_prompts()), tp1.score(_prompts())):
            assert (ours - want).abs().max().item() <= 1e-4
        with pytest.raises(Exception, match="prompt 0"):  # a bad call fails on every rank alike...
            eng.generate([[10**6]])
        assert eng.generate([[5, 6]], max_new_tokens=3)[0].output_ids == \
            tp1.generate([[5, 6]], max_new_tokens=3)[0].output_ids  # ...and the ranks go on together
        # rank 0 alone streams and compiles nothing multi-rank: refused before the workers start the call
        with pytest.raises(UserError, match="streamer=123"):
            eng.generate([[5, 6]], max_new_tokens=3, streamer=123)
        streamed = []
        gen = eng.generate([[5, 6]], max_new_tokens=3, streamer=lambda i, t: streamed.append(t))
        assert streamed == gen[0].output_ids == tp1.generate([[5, 6]], max_new_tokens=3)[0].output_ids
    finally:
        eng.close()
    assert worker.wait(timeout=15) == 0


def test_killed_rank_ends_the_call_with_one_line(engines, one_thread):
    from runtime.engine import Engine
    from runtime.errors import EngineError

    eng = Engine.load(engines["tp2"], device="cpu")
    worker = eng.ranks.procs[0]

    def kill_worker(i, token):  # rank 0 streams; the worker dies between two decode steps
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()

    t0 = time.monotonic()
    with pytest.raises(EngineError) as e:
        eng.generate([[5, 6, 7]], max_new_tokens=NEW_TOKENS, ignore_eos=True, streamer=kill_worker)
    assert time.monotonic() - t0 < 30
    line = str(e.value)
    assert "\n" not in line and "rank 1" in line and f"pid {worker.pid}" in line and "signal 9" in line, line
    _remove_log(line)
    with pytest.raises(EngineError, match="closed"):
        eng.generate([[5]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("engine", ["tp2", "tp2pp2"])
def test_ranks_on_cuda_give_tp1_tokens(engines, engine, one_thread):
    """With a GPU per rank: NCCL, and the decode step with its collectives captured in CUDA graphs; with
    ranks sharing GPUs (one H200: both ranks on it): gloo, pipeline send/recv through host memory, no graphs.
    Compiling is refused on CUDA ranks (one line, and the engine goes on)."""
    from runtime.engine import Engine

    tp1 = Engine.load(engines["tp1"], device="cuda")
    want = [g.output_ids for g in tp1.generate(_prompts(), max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    eng = Engine.load(engines[engine], device="cuda")
    try:
        nccl = eng.ranks.size <= torch.cuda.device_count()
        assert (eng.ranks.backend, eng.use_cuda_graphs) == (("nccl", True) if nccl else ("gloo", False))
        with pytest.raises(UserError, match="CPU ranks only" if engine == "tp2" else "without pipeline stages"):
            eng.compile()
        got = [g.output_ids for g in eng.generate(_prompts(), max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    finally:
        eng.close()
    assert got == want


@pytest.mark.slow
def test_compiled_tp2_gives_tp1_tokens(engines, reference, one_thread, tmp_path, monkeypatch):
    """Engine.compile() of a tp2 engine on CPU: every rank compiles its decode step with the gloo all-reduces
    in it; the tokens stay tp1's. A pipeline engine is refused with one line on every rank."""
    from runtime.engine import Engine

    monkeypatch.setenv("EF_COMPILE_CACHE", str(tmp_path / "compile"))  # the workers inherit it
    eng = Engine.load(engines["tp2"], device="cpu")
    try:
        eng.compile()
        assert eng.compiled
        assert [g.output_ids for g in eng.generate(_prompts(), max_new_tokens=NEW_TOKENS, ignore_eos=True)] == reference
    finally:
        eng.close()
    eng = Engine.load(engines["tp2pp2"], device="cpu")
    try:
        with pytest.raises(UserError, match="pp=2"):
            eng.compile()
        assert eng.generate([[5, 6]], max_new_tokens=3)[0].output_ids == reference_short(engines)
    finally:
        eng.close()


def reference_short(engines) -> list[int]:
    from runtime.engine import Engine

    return Engine.load(engines["tp1"], device="cpu").generate([[5, 6]], max_new_tokens=3)[0].output_ids


@pytest.mark.parametrize("when", ["between calls", "during a call"])
def test_stopped_rank_ends_the_call_within_the_timeout(engines, one_thread, monkeypatch, when):
    """A rank that stops answering (SIGSTOP: alive, silent) ends the driver's call within EF_DIST_TIMEOUT:
    before the call (the driver's call to it) and inside it (the tp group's all-reduce, which torch
    would give 30 minutes unless told otherwise); close() then kills it."""
    from runtime.engine import Engine
    from runtime.errors import EngineError

    timeout = 6
    monkeypatch.setenv("EF_DIST_TIMEOUT", str(timeout))
    eng = Engine.load(engines["tp2"], device="cpu")
    worker, log = eng.ranks.procs[0], Path(eng.ranks.logs[0])
    stopped = []

    def stop_worker(i, token):  # rank 0 streams: the worker stops between two decode steps
        if not stopped:
            os.kill(worker.pid, signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        if when == "between calls":
            stop_worker(0, 0)
        with pytest.raises(EngineError) as e:
            eng.generate([[5, 6, 7]], max_new_tokens=NEW_TOKENS, ignore_eos=True, streamer=stop_worker)
        took = time.monotonic() - stopped[0]
        line = str(e.value)
        assert "\n" not in line and "stopped in a collective" in line and f"EF_DIST_TIMEOUT ({timeout} s)" in line
        assert timeout - 1 < took < timeout + 15, took
        assert worker.wait(timeout=15) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        eng.close()
        log.unlink(missing_ok=True)


def test_dropped_engine_stops_its_worker(engines, one_thread):
    """An engine that goes away without close() stops its workers and leaves the process group, so the
    next multi-rank engine can be opened in this process."""
    import gc

    import torch.distributed as dist

    from runtime.engine import Engine

    eng = Engine.load(engines["tp2"], device="cpu")
    worker = eng.ranks.procs[0]
    del eng
    gc.collect()
    assert worker.wait(timeout=15) == 0 and not dist.is_initialized()


def _workers_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"runtime.worker" in cmdline:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker")
def test_killed_worker_ends_the_cli_with_one_line(engines):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EF_DIST_TIMEOUT": "20"}
    p = subprocess.Popen([sys.executable, "-m", "runtime.run", *_run_args(engines["tp2"])], cwd=str(ROOT),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (workers := _workers_of(p.pid)) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers, "the driver started no worker"
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    line = assert_one_clear_line((p.returncode, out.decode(), err.decode()), "rank 1", f"pid {workers[0]}",
                                 "signal 9")
    assert "load the engine again" in line
    _remove_log(line)


def _remove_log(line: str) -> None:
    """The worker's log that a failure line names (kept for the user; the test has read the line)."""
    log = Path(line.rsplit("log: ", 1)[1].rstrip(")"))
    assert log.is_file(), line
    log.unlink()


@pytest.mark.slow
def test_smollm2_gguf_at_tp3_summarizes_as_tp1(need_shared, tmp_path):
    """The real SmolLM2-135M GGUF (9 heads, 3 KV heads: one per rank) built with tp3: runtime.summarize,
    with no launcher (it starts the 3 ranks), writes tp1's summaries of 10 cnn_dailymail articles, so the
    same ROUGE."""
    from engine_factory import config, pipeline

    gguf = need_shared("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    data = need_shared("data/cnn_dailymail_test100.jsonl")
    runs = {}
    for tp in (1, 3):
        cfg = config.compose([f"model.source={gguf}", f"store={tmp_path / 'store'}", "precision=fp32",
                              "validate.enabled=false", f"parallel.tp={tp}", "limits.max_input_len=256",
                              "limits.max_output_len=32", "limits.max_batch_size=10"])
        engine = pipeline.run(cfg)
        out = tmp_path / f"tp{tp}.json"
        rc, stdout, err = run_module("runtime.summarize", "--engine_dir", engine, "--dataset", data,
                                     "--max_articles", 10, "--batch_size", 10, "--output_len", 32, "--device", "cpu",
                                     "--test_engine", "--json_out", out, timeout=600)
        assert rc == 0, err[-3000:]
        runs[tp] = (json.loads(stdout.strip().splitlines()[-1])["engine"],
                    [a["engine"] for a in json.loads(out.read_text())["articles"]])
    (scores1, texts1), (scores3, texts3) = runs[1], runs[3]
    assert len(texts1) == 10 and all(texts1) and texts3 == texts1
    assert scores3 == scores1 and scores1["rouge1"] > 20, (scores1, scores3)


def test_a_launched_rank_hashes_only_its_own_rank_file(engines, monkeypatch):
    """Under a launcher N ranks load at once: each reads its own rank file's bytes, and only the sizes of
    the others (tampering with rank0 is rank 0's to find)."""
    import runtime.format as fmt

    hashed = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    fmt.verify_engine(engines["tp2"], "full", use_cache=False, own_rank=1)
    assert "rank1.safetensors" in hashed and "rank0.safetensors" not in hashed and "engine.json" in hashed
    hashed.clear()
    fmt.verify_engine(engines["tp2"], "full", use_cache=False)
    assert {"rank0.safetensors", "rank1.safetensors"} <= set(hashed)
