"""Does the compiled decode step write the K/V cache in place with $EF_KV_IN_ATTENTION=1? (GPU only.)

2026-12-07, H100: the int8 7B engine ran 11.84 ms a batch-1 step with it against 3.24 without: ~8.6 ms, what a
copy of its whole 12.9 GB cache (64 slots x 384 positions x 32 layers) costs. The cause: the layer's cache went to
the kernel twice (as K and as V), and Inductor's reinplacing clones the second of two written arguments that share a
tensor, flat (a 1-D buffer, which tests/test_prefill.py's check of shaped buffers did not see; it now counts
elements too). This compiles a small decoder's decode step in the shapes of that engine's step (a
64-slot cache, batch 1) for each setting below and prints, a line each, the generated code's
buffers of a layer's K/V size and the step's time in a CUDA graph; the code goes to --out.

    python tests/perf/kv_write_probe.py --out DIR
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def probe(kv_in_attention: bool, reduce: bool, pdl: bool, slots: int, seq: int, batch: int, out: Path) -> dict:
    from torch._inductor.utils import run_and_get_code

    import runtime.attention_triton as at
    from helpers import random_decoder
    from runtime.engine import _DecodeGraph

    os.environ["EF_KV_IN_ATTENTION"] = "1" if kv_in_attention else "0"
    at.REDUCE = reduce
    torch._dynamo.reset()
    dec = random_decoder("rope_gqa", torch.float16, torch.device("cuda"), cache=(slots, seq))
    assert dec.kv_in_attention == kv_in_attention
    step = torch.compile(dec.decode, fullgraph=True, dynamic=False, options={"triton.enable_pdl": True} if pdl else None)
    tok = torch.zeros(batch, dtype=torch.long, device="cuda")
    pos = torch.full((batch,), 40, dtype=torch.long, device="cuda")
    _, codes = run_and_get_code(step, tok, pos)
    code = "\n".join(codes)
    name = f"kv{int(kv_in_attention)}_reduce{int(reduce)}_pdl{int(pdl)}"
    (out / f"code_{name}.py").write_text(code)
    shape = tuple(dec.kv_cache[0].shape)
    sizes = [", ".join(map(str, s)) for s in (shape, shape[1:], (batch, *shape[2:]))]
    big = [ln.strip() for ln in code.splitlines() if "empty_strided" in ln and any(f"(({s})" in ln or f"({s})," in ln
                                                                                  for s in sizes)]
    numels = {str(torch.Size(shape).numel()), str(torch.Size(shape[1:]).numel()),
              str(batch * torch.Size(shape[2:]).numel())}
    big += [ln.strip() for ln in code.splitlines() if any(f"empty_strided_cuda(({n}, )" in ln for n in numels)]
    copies = [ln.strip() for ln in code.splitlines() if re.search(r"\bcopy_\(|clone\(|triton_poi_fused_\w*copy", ln)]
    g = _DecodeGraph(dec, batch, step)
    g(tok, pos)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        g(tok, pos)
    torch.cuda.synchronize()
    us = (time.perf_counter() - t) / 50 * 1e6
    return {"setting": name, "cache": shape, "batch": batch, "step_us": round(us, 1), "kv_sized_buffers": big[:6],
            "copies": copies[:8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--slots", type=int, default=64)
    # 64: random_decoder's rotary tables end there, and _DecodeGraph warms up at the last cache position (a first
    # call with 384 failed on an index assert, 2026-12-07); one split a sequence at batch 1 then
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for kv, reduce, pdl in itertools.product([False, True], [False, True], [True]):
        try:
            r = probe(kv, reduce, pdl, a.slots, a.seq, 1, out)
        except Exception as e:  # noqa: BLE001
            r = {"setting": f"kv{int(kv)}_reduce{int(reduce)}_pdl{int(pdl)}", "error": repr(e)[:400]}
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
