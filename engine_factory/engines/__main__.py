"""python -m engine_factory.engines: the command line of the published recipes as a whole (the package's
docstring says what each mode does). It imports the builds (engines/__init__.py) and the reproduce checks
(engines/reproduce.py), which import only the builds: no import circle."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from runtime.cli import user_errors_exit
from runtime.errors import UserError

from .. import engines
from . import Outcome, _configs, build_all
from .reproduce import advice, rebuild_and_check


def _table(outcomes: list[Outcome]) -> str:
    rows = [("recipe", "result", "seconds", "detail")] + [
        (o.name, o.result, f"{o.seconds:.1f}" if o.seconds else "", o.detail) for o in outcomes]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}".rstrip() for r in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine_factory.engines", description=engines.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reproduce", action="store_true", help="rebuild the recorded recipes and check them")
    mode.add_argument("--record", action="store_true", help="rebuild and write expect.hash / rank_sha256")
    p.add_argument("--recipes", default=None, help="comma-separated recipe names (default: all that apply)")
    p.add_argument("--store", default=None, help="store of the default mode (default: EF_STORE or the user cache); "
                   "--reproduce and --record always build into a fresh temporary store")
    p.add_argument("--recipes_dir", default=None, help="another folder of recipes (sets EF_RECIPES_DIR)")
    p.add_argument("--dry_run", action="store_true", help="default mode: only say what would be built")
    return p.parse_args(argv)


@user_errors_exit
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.recipes_dir:  # before any config is composed; the builds inherit it
        os.environ["EF_RECIPES_DIR"] = str(Path(args.recipes_dir).expanduser().resolve())
    from ..paths import recipe_names
    from ..store import default_store

    known = recipe_names()
    names = [n for n in (args.recipes or "").split(",") if n] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--recipes: no such recipe {', '.join(unknown)}; published: {', '.join(known)}")
    cfgs = _configs(names)
    if args.reproduce or args.record:
        # reproduce: the recipes that record a hash; record: those with an expect: block (or named)
        chosen = {n: c for n, c in cfgs.items() if (c.expect.get("hash") if args.reproduce else
                                                    c.expect or args.recipes)}
        missing = sorted(set(names) - set(chosen)) if args.recipes else []
        if missing:
            raise UserError(f"--reproduce: {', '.join(missing)} record no expect.hash; run "
                            f"`python -m engine_factory.engines --record --recipes {','.join(missing)}` first")
        if not chosen:
            raise UserError("no recipe records an expect: block")
        print(f"{'reproduce' if args.reproduce else 'record'}: {len(chosen)} recipes, each rebuilt in a fresh store",
              flush=True)
        outcomes = rebuild_and_check(chosen, record=args.record)
    else:
        store = Path(args.store or default_store()).expanduser().resolve()
        outcomes = build_all(cfgs, store, args.dry_run)
        print(f"store: {store}")
    print(_table(outcomes))
    failed = [o for o in outcomes if o.result == "failed"]
    counts = {r: sum(o.result == r for o in outcomes) for r in dict.fromkeys(o.result for o in outcomes)}
    print(", ".join(f"{n} {r}" for r, n in counts.items()))
    if failed:
        if args.reproduce or args.record:
            print("\n".join(advice(o) for o in failed), file=sys.stderr)
        print(f"error: {len(failed)} of {len(outcomes)} recipes failed: {', '.join(o.name for o in failed)}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
