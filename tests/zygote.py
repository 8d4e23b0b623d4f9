"""A Python that has imported torch, Hydra and our packages once, and forks a fresh child for each
`python -m MODULE ARGS` that a test runs (tests/helpers.run_module): each child is a new process with its
own cwd, environment, argv, stdin (/dev/null), stdout and stderr (files), exit code and at-exit handlers,
like a subprocess, without paying ~4 s of imports per command (a few hundred commands per `make test`).

Protocol: one JSON request per line on stdin ({"module", "argv", "cwd", "env", "out", "err", "timeout"}),
one JSON reply per line on stdout ({"rc"} or {"timeout": true}). The first line it writes says whether it
can fork safely ({"ready": true}: no thread was started by the imports); a caller that gets anything else
runs real subprocesses. Only the modules that the commands import are preloaded, never the commands
themselves (runpy would warn) nor mpi4py (its import initializes MPI).
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import threading
import time

PRELOAD = ("torch", "torch.distributed", "numpy", "safetensors.torch", "omegaconf", "hydra", "tqdm", "yaml",
           "runtime.engine", "runtime.cli", "runtime.dist", "runtime.quant", "runtime.format",
           "engine_factory.config", "engine_factory.pipeline")


def _child(req: dict, protocol) -> None:
    """In the forked child: become `python -m module argv...` and never return to the loop."""
    os.setpgid(0, 0)  # a timeout kills the command's whole process group (its ranks, its workers)
    for f in protocol:
        f.close()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if "OMP_NUM_THREADS" in req["env"]:  # OpenMP read the zygote's value when torch loaded
        import torch

        torch.set_num_threads(max(1, int(req["env"]["OMP_NUM_THREADS"])))
    sys.path[0] = os.getcwd()  # as `python -m` has it
    sys.argv = [req["module"], *req["argv"]]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # exceptions and SystemExit propagate: the interpreter prints and exits exactly as `python -m` does
    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def main() -> None:
    sys.path[0] = os.getcwd()
    requests, reply = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w", buffering=1)  # the protocol
    null = os.open(os.devnull, os.O_RDWR)  # fds 0-2 are the children's; nothing printed here reaches the pipe
    os.dup2(null, 0)
    os.dup2(null, 1)
    for name in PRELOAD:
        __import__(name)
    ready = threading.active_count() == 1
    reply.write(json.dumps({"ready": ready}) + "\n")
    if not ready:
        return
    for line in requests:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, (requests, reply))
        reply.write(json.dumps(_wait(pid, req["timeout"])) + "\n")


if __name__ == "__main__":
    main()
