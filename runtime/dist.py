"""The ranks of a multi-rank engine: their process group, the driver and its workers.

An engine built for tp*pp = N ranks runs as N processes in lockstep. Under a launcher (runtime/launch.py:
mpirun, mpiexec, srun, torchrun) every rank runs the same program and Engine.load joins the launcher's
world. With no launcher the process that opens the engine becomes rank 0, the driver: it spawns N-1
local workers (`python -m runtime.worker`), sends each lockstep call (generate, score, compile) to them
as JSON over a gloo group, and runs it with them; only the driver returns results. Workers exit when the
driver closes the engine, and on their own when the driver dies.

gloo on CPU; NCCL on CUDA with one GPU per local rank (`cuda:{local_rank % device_count}`), gloo when
several ranks share a GPU (NCCL refuses two ranks on one device). Settings, from the environment:
  EF_DIST_TIMEOUT       seconds (60): rendezvous and every collective. A rank that dies or stops
                        answering ends the others with one line within this time.
  EF_DIST_LOAD_TIMEOUT  seconds (1800): the wait for the slowest rank to start and load its weights.
  EF_DIST_BACKEND       gloo | nccl, instead of the choice above.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import EngineError, UserError
from .launch import LAUNCH_ENV, World, check_world, detect_world, launcher_store, seconds

log = logging.getLogger(__name__)

_POLL_S = 0.02  # store polling while waiting for ranks to start or load


# ---- process group ---------------------------------------------------------------------------------------
def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _backend(device: torch.device, world: World) -> str:
    forced = os.environ.get("EF_DIST_BACKEND")
    if forced:
        if forced not in ("gloo", "nccl"):
            raise UserError(f"EF_DIST_BACKEND={forced!r}: want gloo or nccl")
        return forced
    if device.type == "cuda" and world.local_size <= torch.cuda.device_count():
        return "nccl"
    return "gloo"


# ---- the ranks of one engine -------------------------------------------------------------------------
_LOCKSTEP: dict[str, callable] = {}  # Engine methods that every rank runs together, by name
_SPAWNED: dict | None = None  # set by runtime.worker: how this worker reaches its driver
_OURS: list = []  # the Ranks whose process group this process initialized (at most one)


def lockstep(fn):
    """An Engine method that every rank runs with the same arguments: the driver sends it to the
    workers first. Under a launcher every rank calls it itself (SPMD)."""
    sig = inspect.signature(fn)
    _LOCKSTEP[fn.__name__] = fn

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        ranks = getattr(self, "ranks", None)
        if ranks is None or not ranks.is_driver:
            return fn(self, *args, **kwargs)
        return ranks.run(fn, self, sig.bind(self, *args, **kwargs))

    return wrapper


class Ranks:
    """The process group of a multi-rank engine as one rank sees it; the driver also owns its workers."""

    def __init__(self, world: World, device: torch.device, store, procs=(), logs=(), spawned: bool = False):
        self.world, self.rank, self.size = world, world.rank, world.size
        self.device = _rank_device(device, world.local_rank)
        self.store = store  # None in a process group that the caller initialized
        self.procs: list[subprocess.Popen] = list(procs)  # the driver's workers: rank i+1
        self.logs: list[str] = list(logs)
        self.is_driver = bool(self.procs)
        self.spawned = spawned  # a worker of a driver
        self.timeout = seconds("EF_DIST_TIMEOUT", 60)
        self.backend = dist.get_backend() if store is None else _backend(self.device, world)
        self.control = None  # driver <-> workers: the calls, as JSON bytes
        self.closed = False
        self.serving = False  # the driver: every rank loaded and waits for calls
        self._owns_group = False
        atexit.register(self.close)

    # ---- starting ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, engine_dir: Path, mapping: dict, device: torch.device, verify: str, tokenizer_dir) -> "Ranks":
        """Join the ranks of a multi-rank engine as a launcher's rank or a spawned worker, or become the
        driver and spawn the workers (no launcher, or a launcher that started one process)."""
        if dist.is_initialized():
            if _OURS:
                raise UserError("another multi-rank engine is open in this process and holds its process "
                                "group; close() it first (one multi-rank engine per process)")
            return cls._joined(engine_dir, mapping, device)
        world = None if _SPAWNED else detect_world()
        if _SPAWNED:
            ranks = cls(_SPAWNED["world"], device, _SPAWNED["store"], spawned=True)
        elif world is not None and world.size > 1:
            check_world(engine_dir, mapping, world)
            ranks = cls(world, device, launcher_store(world, timedelta(seconds=seconds("EF_DIST_TIMEOUT", 60))))
        else:
            ranks = cls._spawn(engine_dir, mapping["tp"] * mapping["pp"], device, verify, tokenizer_dir)
        try:
            ranks._init()
        except BaseException:
            ranks.close()
            raise
        return ranks

    @classmethod
    def _spawn(cls, engine_dir, n, device, verify, tokenizer_dir) -> "Ranks":
        timeout = seconds("EF_DIST_TIMEOUT", 60)
        store = dist.TCPStore("127.0.0.1", 0, n, True, timedelta(seconds=timeout), wait_for_workers=False)
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
        root = str(Path(__file__).resolve().parents[1])  # so that `-m runtime.worker` finds this runtime
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        procs, logs = [], []
        for r in range(1, n):
            fd, log_path = tempfile.mkstemp(prefix=f"ef-rank{r}-", suffix=".log")
            args = {"engine_dir": str(engine_dir), "rank": r, "world": n, "port": store.port,
                    "device": device.type, "verify": "none" if verify == "none" else "size",
                    "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir),
                    "driver_pid": os.getpid()}
            procs.append(subprocess.Popen([sys.executable, "-m", "runtime.worker", json.dumps(args)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                                          env=env, start_new_session=True))
            os.close(fd)
            logs.append(log_path)
        log.info("started %d local ranks for %s: pids %s", n - 1, engine_dir.name, [p.pid for p in procs])
        return cls(World(None, 0, n, 0, n), device, store, procs, logs)

    @classmethod
    def _joined(cls, engine_dir: Path, mapping: dict, device: torch.device) -> "Ranks":
        """The caller's own torch.distributed group (a script that called init_process_group): every rank
        calls Engine.load and then each method itself, as under a launcher."""
        n, size = mapping["tp"] * mapping["pp"], dist.get_world_size()
        if size != n:
            raise UserError(f"engine {engine_dir} is built for {n} ranks (tp={mapping['tp']} pp={mapping['pp']}) "
                            f"but this process's torch.distributed group has {size}; run {n} processes, or "
                            f"open the engine from one process without a group (it starts its {n} ranks)")
        world = detect_world()
        local = (world.local_rank, world.local_size) if world else (dist.get_rank(), size)
        return cls(World(world.launcher if world else None, dist.get_rank(), size, *local), device, None)

    def _init(self) -> None:
        self.store.set(f"ef/joining/{self.rank}", "1")
        if self.is_driver:  # every worker is about to join (or one died or failed to open the engine)
            self.wait_all("joining", "start")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, store=dist.PrefixStore("pg", self.store), rank=self.rank,
                                world_size=self.size, timeout=timedelta(seconds=self.timeout))
        self._owns_group = True
        _OURS.append(self)
        if self.is_driver or self.spawned:  # workers wait on it between calls for as long as the driver lives
            self.control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        log.info("rank %d/%d on %s (%s)", self.rank, self.size, self.device, self.backend)

    def report(self, what: str, error: BaseException | str | None = None) -> None:
        """Tell the other ranks that this rank reached `what` (or failed on the way there)."""
        if self.store is None:
            return
        msg = "ok" if error is None else (error if isinstance(error, str) else _one_line(error))
        try:
            self.store.set(f"ef/{what}/{self.rank}", msg)
        except Exception:  # the store's host is gone: the others learn of this rank from its exit
            pass

    def wait_all(self, what: str, during: str) -> None:
        """Wait until every rank reported `what`; a rank that failed or died is one EngineError."""
        deadline = time.monotonic() + seconds("EF_DIST_LOAD_TIMEOUT", 1800)
        pending = [r for r in range(self.size) if r != self.rank]
        while pending:
            for r in list(pending):
                failed = self._reported("loaded", r)
                if failed not in (None, "ok"):
                    raise EngineError(f"rank {r} could not open the engine: {failed.removeprefix('error: ')}")
                if self.store.check([f"ef/{what}/{r}"]):
                    pending.remove(r)
            dead = self._dead_worker(during)
            if dead:
                raise EngineError(dead)
            if pending and time.monotonic() > deadline:
                raise EngineError(f"ranks {pending} did not {during} within EF_DIST_LOAD_TIMEOUT "
                                  f"({seconds('EF_DIST_LOAD_TIMEOUT', 1800):g} s)")
            if pending:
                time.sleep(_POLL_S)

    def _reported(self, what: str, r: int) -> str | None:
        key = f"ef/{what}/{r}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def loaded(self) -> None:
        if self.store is None:
            return  # the caller's group: each rank raises its own errors
        self.report("loaded")
        self.wait_all("loaded", "load its weights")
        self.serving = self.is_driver

    # ---- the driver's calls -----------------------------------------------------------------------
    def run(self, fn, engine, bound: inspect.BoundArguments):
        """Send fn(**arguments) to the workers, run it here with them, return rank 0's result."""
        self._check_usable(fn.__name__)
        kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
        streamer = kwargs.get("streamer")
        if streamer is not None:  # rank 0 alone streams: check it here, before the workers start the call
            if not callable(streamer):
                raise UserError(f"streamer={streamer!r:.40}: must be a function (i, token) or None")
            kwargs["streamer"] = _guarded(streamer)
        shared = {k: (None if k == "streamer" else v) for k, v in kwargs.items()}
        try:
            payload = json.dumps({"call": fn.__name__, "kwargs": shared}, default=_plain).encode()
        except TypeError as e:
            raise UserError(f"{fn.__name__}(): an argument cannot be sent to the engine's other ranks "
                            f"({e}); pass plain lists, numbers and strings") from None
        self.serving = False  # until the call returns: a failure in it leaves workers in collectives
        try:
            self._send(payload)
            result = fn(engine, **kwargs)
        except UserError:
            self.serving = True
            raise  # every rank raised it on the same arguments before any collective
        except BaseException as e:
            line = self._failure(fn.__name__, e)
            self.close()
            if line is None:
                raise  # rank 0's own bug or a KeyboardInterrupt: its traceback; the workers are stopped
            raise EngineError(line) from None
        self.serving = True
        return result

    def _send(self, payload: bytes) -> None:
        """To every worker, within EF_DIST_TIMEOUT: the control group waits for as long as the driver lives
        (workers idle in it between calls), but a worker that does not take a call is a failure."""
        within = timedelta(seconds=self.timeout)
        for t in (torch.tensor([len(payload)], dtype=torch.int64),
                  torch.frombuffer(bytearray(payload), dtype=torch.uint8)):
            dist.broadcast(t, 0, group=self.control, async_op=True).wait(within)

    def _recv(self) -> dict:
        n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, 0, group=self.control)
        buf = torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.control)
        return json.loads(buf.numpy().tobytes())

    def serve(self, engine) -> None:
        """A worker's loop: run the driver's calls until it closes the engine."""
        while True:
            msg = self._recv()
            if msg["call"] is None:
                return
            try:
                _LOCKSTEP[msg["call"]](engine, **msg["kwargs"])
            except UserError:
                continue  # the driver raised the same error to its caller
            except BaseException as e:
                self.report("failed", e)
                raise

    def _check_usable(self, call: str) -> None:
        if self.closed:
            raise EngineError("this multi-rank engine was closed (or lost a rank); load it again")
        dead = self._dead_worker(f"wait for {call}")
        if dead:
            self.close()
            raise EngineError(dead)

    def _dead_worker(self, during: str) -> str | None:
        for r, (p, log_path) in enumerate(zip(self.procs, self.logs), start=1):
            code = p.poll()
            if code is None:
                continue
            if code < 0:
                how = f"was killed by signal {-code} ({_signal_name(-code)})"
            else:
                how = f"exited with code {code}"
                why = self._reported("failed", r) or self._reported("loaded", r)
                why = why if why not in (None, "ok") else _last_line(log_path)
                how += f" ({why})" if why else ""
            return (f"rank {r} (pid {p.pid}) {how} during {during}; the engine's other ranks are stopped: "
                    f"load the engine again (rank {r}'s log: {log_path})")
        return None

    def _failure(self, call: str, e: BaseException) -> str | None:
        """One line for a call that failed because of another rank; None for rank 0's own error."""
        if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _is_comm_error(e))):
            return None
        for _ in range(50):  # a peer's closed socket can reach us before its exit status does
            dead = self._dead_worker(call)
            if dead or not self.procs:
                break
            time.sleep(0.05)
        if dead:
            return dead
        return (f"rank {self.rank}: {call} stopped in a collective ({_one_line(e)[:200]}); another rank "
                f"died or did not answer within EF_DIST_TIMEOUT ({self.timeout:g} s)")

    # ---- closing ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (the driver), leave the process group. Idempotent; runs at exit."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        grace = 0.0  # workers that are not serving calls (still starting, or in a failed call) are killed
        if self.serving and self.procs and all(p.poll() is None for p in self.procs):
            try:
                self._send(json.dumps({"call": None}).encode())
                grace = 10.0
            except Exception:  # a worker went away meanwhile
                pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if grace and all(p.returncode == 0 for p in self.procs):  # failures keep the logs they name
            for log_path in self.logs:
                Path(log_path).unlink(missing_ok=True)
        if self._owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        if self in _OURS:
            _OURS.remove(self)
        self.store = None


class StreamerFailed(RuntimeError):
    """The caller's streamer raised on rank 0 while the other ranks were inside the call."""


def _guarded(streamer):
    def call(i, token):
        try:
            streamer(i, token)
        except BaseException as e:  # the workers are in collectives: the engine cannot go on
            raise StreamerFailed(f"the streamer raised {type(e).__name__}: {e}") from e
    return call


def _plain(obj):
    """JSON for what generate()/score() accept besides lists, numbers and strings."""
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _is_comm_error(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Connection", "timed out", "Timed out", "timeout"))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__) if isinstance(e, UserError) else \
        f"{type(e).__name__}: {text[0] if text else ''}"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "?"


def _last_line(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def load_engine(cls, engine_dir: Path, config: dict, device: torch.device, verify: str, tokenizer_dir):
    """Engine.load of an engine of tp*pp > 1 ranks: this process's rank, with its layout and Comm."""
    from .parallel import Comm, RankLayout
    from .spec import ModelSpec

    mapping = config["mapping"]
    ranks = Ranks.start(engine_dir, mapping, device, verify, tokenizer_dir)
    try:
        layout = RankLayout.of(ModelSpec.from_dict(config["spec"]), mapping, ranks.rank)
        comm = Comm(mapping["tp"], mapping["pp"], timeout=timedelta(seconds=ranks.timeout))
        engine = cls._from_rank(engine_dir, config, ranks.device, ranks.rank, tokenizer_dir,
                                layout=layout, comm=comm)
    except BaseException as e:
        ranks.report("loaded", e)
        ranks.close()
        raise
    try:
        ranks.loaded()  # every rank has its weights, or one line about the rank that failed
    except BaseException:
        ranks.close()
        raise
    if ranks.backend == "gloo" and ranks.device.type == "cuda":
        engine.use_cuda_graphs = False  # gloo's collectives go through the host: no CUDA graph captures them
    engine.ranks = ranks
    weakref.finalize(engine, ranks.close)  # an engine dropped without close() still stops its workers
    return engine
