"""python -m runtime.worker ARGS_JSON: one local rank of a multi-rank engine, spawned by its driver.

The driver (the process that called Engine.load without a launcher) passes the engine, this rank and
the port of its rendezvous store. The worker loads its rank file, then runs the driver's calls until
the driver closes the engine; it exits on its own when the driver dies.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta


def _exit_with_driver(driver_pid: int) -> None:
    """Parent death ends the worker even when it is blocked in a collective."""
    while True:
        if os.getppid() != driver_pid:
            os._exit(3)
        time.sleep(0.5)


def main(argv=None) -> None:
    args = json.loads((argv or sys.argv[1:])[0])
    threading.Thread(target=_exit_with_driver, args=(args["driver_pid"],), daemon=True).start()

    import torch.distributed as tdist

    from . import dist
    from .launch import seconds
    from .cli import setup_logging
    from .engine import Engine
    from .errors import UserError

    setup_logging()
    rank, n = args["rank"], args["world"]
    store = tdist.TCPStore("127.0.0.1", args["port"], n, False,
                           timedelta(seconds=seconds("EF_DIST_TIMEOUT", 60)))
    dist._SPAWNED = {"world": dist.World(None, rank, n, rank, n), "store": store}
    try:
        engine = Engine.load(args["engine_dir"], device=args["device"], verify=args["verify"],
                             tokenizer_dir=args["tokenizer_dir"])
    except BaseException as e:  # the driver names this rank and its reason
        try:
            store.set(f"ef/loaded/{rank}", dist._one_line(e))
        except Exception:
            pass
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    try:
        engine.ranks.serve(engine)
    finally:
        engine.ranks.close()


if __name__ == "__main__":
    main()
