"""Does a multi-rank engine compute the function of its tp1 engine? Greedy tokens can part at near-ties
(bf16 partial sums round differently when a GEMM is split across ranks), so look at the logits too.

python tests/perf/tp_logits_check.py --ref ENGINE_TP1 --other ENGINE_TP2 [--device cuda] [--new 32]

tp1 generates greedily; both engines then score the same sequences (teacher forcing). Prints one JSON
line: the largest |logit difference| relative to the logits' spread, the share of positions whose argmax
agrees, and for each disagreeing position tp1's margin between its best and second-best logit next to
the difference there: a disagreement explained by rounding has a margin smaller than the difference.

--oracle ENGINE (e.g. the fp32 tp1 engine of the same weights): both engines' logits are also set against
the oracle's on the same sequences; a multi-rank engine that is right is as far from it as tp1 is.
"""
from __future__ import annotations

import argparse
import json

import torch

from runtime.engine import Engine

PROMPTS = [[1, 403, 407, 261, 378], [1, 15, 200, 7, 9, 11, 13]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True)
    p.add_argument("--other", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--oracle", help="an engine of higher precision: how far are ref and other from it")
    a = p.parse_args()
    ref = Engine.load(a.ref, device=a.device, verify="size")
    other = Engine.load(a.other, device=a.device, verify="size")
    gens = ref.generate(PROMPTS, max_new_tokens=a.new, ignore_eos=True)
    gen_other = other.generate(PROMPTS, max_new_tokens=a.new, ignore_eos=True)
    seqs = [list(pr) + list(g.output_ids) for pr, g in zip(PROMPTS, gens)]
    out = {"ref": a.ref, "other": a.other, "dtype": ref.config["dtype"], "sequences": []}
    for s, pr, g, go in zip(seqs, PROMPTS, gens, gen_other):
        lr, lo = ref.score(s).float(), other.score(s).float()
        diff = (lr - lo).abs().max(dim=-1).values  # (T,)
        spread = (lr.max(-1).values - lr.min(-1).values).clamp(min=1e-9)
        top2 = lr.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        disagree = (lr.argmax(-1) != lo.argmax(-1)).nonzero().flatten().tolist()
        first = next((i for i, (u, v) in enumerate(zip(g.output_ids, go.output_ids)) if u != v), None)
        out["sequences"].append({
            "tokens": len(s), "greedy_identical": list(g.output_ids) == list(go.output_ids),
            "greedy_first_difference": first,
            "max_rel_logit_diff": round(float((diff / spread).max()), 6),
            "argmax_agreement": round(1 - len(disagree) / len(s), 4),
            "disagreements": [{"pos": i, "ref_margin": round(float(margin[i]), 5),
                               "logit_diff": round(float(diff[i]), 5)} for i in disagree[:8]],
            "median_ref_margin": round(float(margin.median()), 5),
        })
    print(json.dumps(out), flush=True)
    if a.oracle:
        oracle = Engine.load(a.oracle, device=a.device, verify="size")
        rows = []
        for s in seqs:
            lx = oracle.score(s).float()
            spread = (lx.max(-1).values - lx.min(-1).values).clamp(min=1e-9)
            row = {"tokens": len(s)}
            for name, eng in (("ref", ref), ("other", other)):
                le = eng.score(s).float()
                row[name] = {"max_rel_logit_diff": round(float(((le - lx).abs().max(-1).values / spread).max()), 6),
                             "mean_abs_logit_diff": round(float((le - lx).abs().mean()), 6),
                             "argmax_agreement": round(float((le.argmax(-1) == lx.argmax(-1)).float().mean()), 4)}
            rows.append(row)
        print(json.dumps({"oracle": a.oracle, "dtype": oracle.config["dtype"], "against_oracle": rows}), flush=True)
    other.close()


if __name__ == "__main__":
    main()
