"""Summarise bench_linear.py --sweep rows: per (mode, batch), each launch shape tried on all four linears of
a layer, summed (µs a layer), best first, next to the default (and torch's tinygemm where bench_linear timed
it: int4 in bf16 up to 16 rows, as `engine_us`); the variant flags spelled out.

    python tests/perf/sweep_summary.py OUT/linear.jsonl [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.jsonl)]
    groups = collections.defaultdict(list)
    for r in rows:
        if r.get("kind") == "sweep" and "all" in r:
            groups[r["mode"], r["M"]].append(r)
    for (mode, M), rs in groups.items():
        total, seen = collections.defaultdict(float), collections.Counter()
        for r in rs:
            for us, cfg in r["all"]:
                key = "default" if cfg == "default" else json.dumps(cfg, sort_keys=True)
                total[key] += us
                seen[key] += 1
        full = {k: t for k, t in total.items() if seen[k] == len(rs)}  # shapes tried on every linear
        print(f"== {mode} M={M}: {len(full)} launch shapes on all {len(rs)} linears; default "
              f"{full.get('default', float('nan')):.1f} us a layer; per-linear best summed "
              f"{sum(r['best_us'] for r in rs):.1f}"
              + (f"; torch's tinygemm {sum(r['engine_us'] for r in rs):.1f}"
                 if all("engine_us" in r for r in rs) else ""))
        for k, t in sorted(full.items(), key=lambda kv: kv[1])[:args.top]:
            print(f"  {t:8.1f} us  {k}")


if __name__ == "__main__":
    main()
