"""What every command line of ours shares: logging set-up and one-line errors for user mistakes."""
from __future__ import annotations

import functools
import logging
import os
import sys

from .errors import UserError


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=(level or os.environ.get("EF_LOG_LEVEL", "WARNING")).upper(),
                        format="[%(levelname)s] %(name)s: %(message)s", stream=sys.stderr)


def user_errors_exit(fn):
    """Run fn; a UserError (or a missing file) becomes one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
