"""python -m runtime.verify DIR [--mode full|size]: check an engine by hand, as a load checks it.

Reads every byte again (the cache of verified files is not consulted, so silent disk corruption is found
too) and prints `ok: DIR (N files, sha256 checked)`, or one `error:` line and exits 2. The manifest
detects corruption and tampering of the files it lists; it is not a signature (whoever can write the
folder can rewrite the manifest too).
"""
from __future__ import annotations

import argparse

from .cli import setup_logging, user_errors_exit
from .format import verify_engine


@user_errors_exit
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m runtime.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine_dir", help="engine folder (the path that the build printed)")
    p.add_argument("--mode", default="full", choices=["full", "size"],
                   help="full: sha256 and size of every listed file; size: sizes only")
    p.add_argument("--log_level", default=None)
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    manifest, _ = verify_engine(args.engine_dir, args.mode, use_cache=False)
    what = "sha256 checked" if args.mode == "full" else "sizes checked"
    print(f"ok: {args.engine_dir} ({len(manifest['files'])} files, {what})")


if __name__ == "__main__":
    main()
