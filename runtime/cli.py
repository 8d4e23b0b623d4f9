"""What every command line of ours shares: logging set-up and one-line errors for user mistakes."""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback

from .errors import UserError


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=(level or os.environ.get("EF_LOG_LEVEL", "WARNING")).upper(),
                        format="[%(levelname)s] %(name)s: %(message)s", stream=sys.stderr)


def user_errors_exit(fn):
    """Run fn; a UserError (or a missing file) becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet = _quiet_unless_rank0()
        try:
            return _traced(fn, quiet, *args, **kwargs)
        except UserError as e:
            if not quiet:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            if not quiet:
                print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def _quiet_unless_rank0() -> bool:
    """Under a launcher every rank runs the command; ranks other than 0 print nothing (no stdout, no
    warnings, no error line: rank 0 prints the same one), except the traceback of a crash of their own."""
    from .launch import launcher_rank

    if launcher_rank() == 0:
        return False
    sys.stdout = sys.stderr = open(os.devnull, "w")
    logging.disable(logging.WARNING)
    return True


def _traced(fn, quiet: bool, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        if quiet:
            traceback.print_exc(file=sys.__stderr__)
        raise
