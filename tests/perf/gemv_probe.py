"""Batch-1..512 linears of a LLaMA-2-7B layer through kernels we could adopt (a measurement on the GPU, not a
test): torch's own int4 tinygemm (`torch._weight_int4pack_mm`, as torchao and gpt-fast call it) fed from our
packed int4 format, torch's `_weight_int8pack_mm` where CUDA has it, and a Triton GEMV that keeps a 2-D fp32
accumulator and reduces once at the end (bf16, int8 per channel, int4 g128), each next to cuBLAS bf16; and
our int4 g128 GEMV over the weights repacked K-major (kmajor), and
GemLite's int4 kernels (`pip install gemlite`, Triton, HQQ's w = (q - zero) * scale per group: our int4 g128 as it
is, unpacked to levels), at its own choice of kernel (GEMV_REVSPLITK at batch 1) and, at batch 1, its plain GEMV;
and (gluon) the experimental Gluon MMA GEMV of runtime/quant/gluon_int4.py at batch 1 and 8, by launch shape.

    python tests/perf/gemv_probe.py --out OUT [--sections gemlite,tinygemm]

Every row says the kernel's relative error against F.linear on the dequantized weight (the CPU
reference's arithmetic), so a fast wrong kernel is visible.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.bench_attention import time_graph  # noqa: E402
from runtime.quant import MODES  # noqa: E402
from runtime.quant import int4_wo  # noqa: E402
from runtime.quant.triton_wo import _store_split  # noqa: E402

SHAPES = {"attn.qkv": (12288, 4096), "attn.o": (4096, 4096), "mlp.up": (22016, 4096), "mlp.down": (4096, 11008)}
COPIES = 4
MS = (1, 2, 4, 8, 16, 64, 512)


@triton.jit
def _gemv2(X, W, SCALE, ZERO, OUT, N, K, G, stride_wn, KIND: tl.constexpr, GROUP: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """KIND 0: bf16 weights; 1: int8 per channel; 2: packed int4 asymmetric, BLOCK_K features = one group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    HALF: tl.constexpr = BLOCK_K // 2 if KIND == 2 else BLOCK_K
    j = tl.arange(0, HALF)
    rows = W + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, HALF], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        if KIND == 2:
            g = k0 // GROUP
            s = tl.load(SCALE + n * G + g, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(ZERO + n * G + g, mask=nmask, other=0).to(tl.float32)
            b = tl.load(rows + (k0 // 2 + j)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
            xe = tl.load(X + k0 + 2 * j).to(tl.float32)
            xo = tl.load(X + k0 + 2 * j + 1).to(tl.float32)
            lo = ((b & 15).to(tl.float32) - z[:, None]) * s[:, None]
            hi = ((b >> 4).to(tl.float32) - z[:, None]) * s[:, None]
            acc += lo * xe[None, :] + hi * xo[None, :]
        else:
            w = tl.load(rows + (k0 + j)[None, :], mask=nmask[:, None], other=0).to(tl.float32)
            x = tl.load(X + k0 + j).to(tl.float32)
            acc += w * x[None, :]
    dot = tl.sum(acc, axis=1)
    if KIND == 1:
        dot = dot * tl.load(SCALE + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(OUT + pid_k.to(tl.int64) * N + n, dot, mask=nmask)


@triton.jit
def _kmajor4(X, WT, ST, ZT, OUT, PART, LOCKS, N, G, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
             SPLIT_K: tl.constexpr):
    """int4 g128 GEMV on the weights repacked K-major: word (r, n) of WT (K/8, N) int32 holds features 8r..8r+7
    of output n (our bytes of row n read as little-endian int32: nibble i = feature 8r + i), scales and zeros
    (G, N): every load runs along N, contiguous, and a group's sum over its GROUP / 8 words stays in a thread
    (no shuffles); a nibble becomes fp32 128 + q by a shift and an and-or (MAGIC), then one FMA. K split
    SPLIT_K ways (program k takes groups k, k + SPLIT_K, ...), the splits added in the kernel by each column
    tile's last program (triton_wo._store_split's REDUCE: in a fixed order, no summing kernel)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    R: tl.constexpr = GROUP // 8
    r = tl.arange(0, R)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(pid_k, G, SPLIT_K):
        w = tl.load(WT + (g * R + r).to(tl.int64)[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
        s = tl.load(ST + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(ZT + g * N + n, mask=nmask, other=0).to(tl.float32)
        dot = tl.zeros([R, BLOCK_N], tl.float32)
        xs = tl.zeros([R], tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(X + (g * R + r) * 8 + i).to(tl.float32)
            if i < 4:
                q = ((w << (16 - 4 * i)) & 0xF0000) | 0x43000000
            elif i == 4:
                q = (w & 0xF0000) | 0x43000000
            else:
                q = ((w >> (4 * i - 16)) & 0xF0000) | 0x43000000
            dot += q.to(tl.float32, bitcast=True) * xi[:, None]
            xs += xi
        acc += s * (tl.sum(dot, axis=0) - (z + 128.0) * tl.sum(xs, axis=0))
    _store_split(acc, OUT, PART, LOCKS, n.to(tl.int64), nmask, pid_k, pid_n, N, SPLIT_K, SPLIT_K > 1, OUT, False)


def kmajor_operands(weight, scale, zero):
    """Our int4 (N, K/2) uint8 + (N, G) scales / zeros as _kmajor4 reads them (a copy: made once, at load)."""
    N = weight.shape[0]
    wt = weight.contiguous().view(torch.int32).reshape(N, -1).t().contiguous()
    return wt, scale.t().contiguous(), zero.t().contiguous()


def kmajor4(x, ops, BLOCK_N, SPLIT_K, num_warps, num_stages=2, group=128):
    wt, st, zt = ops
    N, G = wt.shape[1], st.shape[0]
    tiles = triton.cdiv(N, BLOCK_N)
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    part = torch.empty((SPLIT_K, N), dtype=torch.float32, device=x.device) if SPLIT_K > 1 else out
    locks = torch.zeros(tiles, dtype=torch.int32, device=x.device) if SPLIT_K > 1 else out
    _kmajor4[(tiles, SPLIT_K)](x, wt, st, zt, out, part, locks, N, G, BLOCK_N=BLOCK_N, GROUP=group,
                               SPLIT_K=SPLIT_K, num_warps=num_warps, num_stages=num_stages)
    return out


def gemv2(x, w, scale, zero, kind, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages=3):
    N = w.shape[0]
    K = x.shape[-1]
    G = scale.numel() // N if scale is not None else 1
    out = torch.empty((SPLIT_K, N), dtype=torch.float32, device=x.device)
    s = scale if scale is not None else w
    z = zero if zero is not None else s
    _gemv2[(triton.cdiv(N, BLOCK_N), SPLIT_K)](x, w, s, z, out, N, K, G, w.stride(0), KIND=kind,
                                                GROUP=K // G, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K,
                                                num_warps=num_warps, num_stages=num_stages)
    return out.sum(0).to(x.dtype)[None]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget_s", type=float, default=200, help="for the GEMV sweep")
    ap.add_argument("--sections", default="tinygemm,int8pack,triton,dequant,gemv2")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sink = open(Path(args.out) / "gemv_probe.jsonl", "a")
    t_end = time.time() + args.budget_s

    def out(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA")
           for op in ("_weight_int4pack_mm", "_weight_int8pack_mm", "_weight_int4pack_mm_with_scales_and_zeros")}
    out({"kind": "env", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "cuda_kernels": has})
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q4, q8 = MODES["int4_wo_g128"], MODES["int8_wo"]
    data = {}
    for lin, (N, K) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", generator=gen) * 0.02 for _ in range(COPIES)]
        data[lin] = {"bf16": [w.to(dt) for w in ws], "int4": [q4.quantize(w, dt) for w in ws],
                     "int8": [q8.quantize(w, dt) for w in ws]}
        del ws
    ref = {}  # (lin, M) -> reference outputs of copy 0 per kind
    for lin, (N, K) in SHAPES.items():
        d = data[lin]
        deq4 = int4_wo.dequantize(d["int4"][0]["weight"], d["int4"][0]["scale"], d["int4"][0]["zero"], dt)
        deq8 = d["int8"][0]["weight"].to(dt) * d["int8"][0]["scale"].to(dt)[:, None]
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=dt, generator=gen)
            ref[lin, M] = (x, {"bf16": F.linear(x, d["bf16"][0]), "int4": F.linear(x, deq4), "int8": F.linear(x, deq8)})
            us = time_graph(lambda: [F.linear(x, w) for w in d["bf16"]], 15) * 1e6 / COPIES
            out({"kind": "probe", "kernel": "cublas", "fmt": "bf16", "linear": lin, "M": M, "us": round(us, 2),
                 "GB_s": round(N * K * 2 / us / 1e3, 1)})
    # torch's int4 tinygemm
    if has["_weight_int4pack_mm"] and "tinygemm" in sections:  # as the engine feeds it (triton_wo.tinygemm_operands)
        from runtime.quant.triton_wo import tinygemm_operands

        for lin, (N, K) in SHAPES.items():
            packs = [tinygemm_operands(t["weight"], t["scale"], t["zero"]) for t in data[lin]["int4"]]
            for M in MS[:-1]:
                x, r = ref[lin, M]
                try:
                    err = rel(torch.ops.aten._weight_int4pack_mm(x, packs[0][0], packs[0][2], packs[0][1]), r["int4"])
                    us = time_graph(lambda: [torch.ops.aten._weight_int4pack_mm(x, p, g, sz) for p, sz, g in packs],
                                    15) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "tinygemm", "linear": lin, "M": M, "why": str(e)[:300]})
                    continue
                out({"kind": "probe", "kernel": "tinygemm", "fmt": "int4_g128", "linear": lin, "M": M,
                     "us": round(us, 2), "GB_s": round(N * K / 2 / us / 1e3, 1), "rel_err": err})
            del packs
    if "kmajor" in sections:  # _kmajor4 over a small launch grid, batch 1, best per linear
        for lin, (N, K) in SHAPES.items():
            x, r = ref[lin, 1]
            opss = [kmajor_operands(t["weight"], t["scale"], t["zero"]) for t in data[lin]["int4"]]
            rows = []
            # (2026-12-07: the best of splits 1-16, stages 1, were all at split 16, then summed by a second kernel)
            for bn, sk, nw, ns in itertools.product((128, 256, 512), (8, 16, 32, 64), (4, 8), (1, 3)):
                if time.time() > t_end or bn < 32 * nw or sk > K // 128:
                    continue
                try:
                    err = rel(kmajor4(x, opss[0], bn, sk, nw, ns), r["int4"])
                    us = time_graph(lambda: [kmajor4(x, o, bn, sk, nw, ns) for o in opss], 9) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "kmajor4", "cfg": [bn, sk, nw, ns], "why": str(e)[:200]})
                    continue
                rows.append((us, [bn, sk, nw, ns], err))
            rows.sort(key=lambda t: t[0])
            if rows:
                out({"kind": "probe", "kernel": "kmajor4", "fmt": "int4_g128", "linear": lin, "M": 1,
                     "us": round(rows[0][0], 2), "GB_s": round(N * K / 2 / rows[0][0] / 1e3, 1),
                     "rel_err": rows[0][2], "best": rows[0][1], "top5": [(round(u, 2), c) for u, c, _ in rows[:5]],
                     "tried": len(rows)})
            del opss
    if "gemlite" in sections:
        gemlite_section(data, ref, out)
    if "triton" in sections:  # our weight-only kernel (runtime/quant/triton_wo.py) at its default launch
        from runtime.quant import triton_wo

        for fmt, bits in (("int4", 4), ("int8", 8)):
            for lin, (N, K) in SHAPES.items():
                ts = data[lin][fmt]
                for M in MS:
                    x, r = ref[lin, M]
                    try:
                        err = rel(triton_wo.launch(x, ts[0]["weight"], ts[0]["scale"], ts[0].get("zero"), bits), r[fmt])
                        us = time_graph(lambda: [triton_wo.launch(x, t["weight"], t["scale"], t.get("zero"), bits)
                                                 for t in ts], 15) * 1e6 / COPIES
                    except Exception as e:  # noqa: BLE001
                        out({"kind": "failed", "kernel": "triton_wo", "fmt": fmt, "linear": lin, "M": M, "why": str(e)[:300]})
                        continue
                    out({"kind": "probe", "kernel": "triton_wo", "fmt": fmt, "linear": lin, "M": M, "us": round(us, 2),
                         "GB_s": round(N * K * bits / 8 / us / 1e3, 1), "rel_err": err})
    if "gluon" in sections:  # runtime/quant/gluon_int4.py (experimental): MMA over weights in fragment order
        from runtime.quant import gluon_int4

        for lin, (N, K) in SHAPES.items():
            try:  # (as the engine makes them at load: gluon_int4.operands)
                packs = [gluon_int4.operands(t["weight"], t["scale"], t["zero"])[:2] for t in data[lin]["int4"]]
            except Exception as e:  # noqa: BLE001
                out({"kind": "failed", "kernel": "gluon_int4", "linear": lin, "why": str(e)[:300]})
                continue
            shapes = [gluon_int4.default_launch(N, K, torch.cuda.get_device_properties(0).multi_processor_count),
                      (64, 1, 4, 2), (128, 2, 4, 1), (64, 2, 4, 1), (64, 4, 4, 0), (64, 4, 4, 2), (64, 8, 4, 1),
                      (64, 8, 4, 2), (128, 4, 8, 1), (128, 8, 8, 1), (64, 16, 4, 1)]
            for M, (bn, split, warps, ahead) in itertools.product((1, 8), shapes):
                x, r = ref[lin, M]
                try:
                    err = rel(gluon_int4.launch(x, *packs[0], N, K, bn, split, warps, ahead), r["int4"])
                    us = time_graph(lambda: [gluon_int4.launch(x, wp, sz, N, K, bn, split, warps, ahead)
                                             for wp, sz in packs], 15) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "gluon_int4", "linear": lin, "M": M, "why": str(e)[:300]})
                    continue
                out({"kind": "probe", "kernel": "gluon_int4", "fmt": "int4_g128", "linear": lin, "M": M,
                     "cfg": {"BN": bn, "SPLIT_K": split, "num_warps": warps, "PREFETCH": ahead}, "us": round(us, 2),
                     "GB_s": round(N * K / 2 / us / 1e3, 1), "rel_err": err})
    if "dequant" in sections:  # the prefill path's one-pass dequantize: bytes read + written per second
        from runtime.quant import triton_wo

        for fmt, bits in (("int4", 4), ("int8", 8)):
            for lin, (N, K) in SHAPES.items():
                ts = data[lin][fmt]
                us = time_graph(lambda: [triton_wo.dequantize(t["weight"], t["scale"], t.get("zero"), bits)
                                         for t in ts], 15) * 1e6 / COPIES
                moved = N * K * (bits / 8 + 2)
                out({"kind": "probe", "kernel": "dequantize", "fmt": fmt, "linear": lin, "us": round(us, 2),
                     "GB_s": round(moved / us / 1e3, 1)})
    if has["_weight_int8pack_mm"] and "int8pack" in sections:
        for lin, (N, K) in SHAPES.items():
            ts = data[lin]["int8"]
            for M in (1, 8):
                x, r = ref[lin, M]
                try:
                    err = rel(torch.ops.aten._weight_int8pack_mm(x, ts[0]["weight"], ts[0]["scale"].to(dt)), r["int8"])
                    us = time_graph(lambda: [torch.ops.aten._weight_int8pack_mm(x, t["weight"], t["scale"].to(dt))
                                             for t in ts], 15) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "int8pack", "linear": lin, "M": M, "why": str(e)[:300]})
                    continue
                out({"kind": "probe", "kernel": "int8pack", "fmt": "int8", "linear": lin, "M": M, "us": round(us, 2),
                     "GB_s": round(N * K / us / 1e3, 1), "rel_err": err})
    # Triton GEMV with a 2-D accumulator, batch 1
    grid = list(itertools.product((16, 32, 64), (128, 256, 512), (1, 4, 8), (4, 8), (3,)))
    for fmt, kind in (("int8", 1), ("int4", 2), ("bf16", 0)) if "gemv2" in sections else ():
        best = {lin: [] for lin in SHAPES}
        for bn, bk, sk, nw, ns in grid:
            if kind == 2 and bk != 128:
                continue
            if time.time() > t_end:
                out({"kind": "note", "why": "budget spent", "fmt": fmt})
                break
            for lin, (N, K) in SHAPES.items():
                if K % (bk * sk):
                    continue
                x, r = ref[lin, 1]
                ts = data[lin][fmt]

                def call(t):
                    if fmt == "bf16":
                        return gemv2(x, t, None, None, 0, bn, bk, sk, nw, ns)
                    return gemv2(x, t["weight"], t["scale"], t.get("zero"), kind, bn, bk, sk, nw, ns)
                try:
                    err = rel(call(ts[0]), r[fmt])
                    us = time_graph(lambda: [call(t) for t in ts], 9) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "gemv2", "fmt": fmt, "cfg": [bn, bk, sk, nw, ns], "why": str(e)[:200]})
                    continue
                best[lin].append((us, [bn, bk, sk, nw, ns], err))
        for lin, rows in best.items():
            rows.sort(key=lambda r: r[0])
            if rows:
                N, K = SHAPES[lin]
                nb = N * K * {"bf16": 2, "int8": 1, "int4": 0.5}[fmt]
                out({"kind": "probe", "kernel": "gemv2", "fmt": fmt, "linear": lin, "M": 1, "us": round(rows[0][0], 2),
                     "GB_s": round(nb / rows[0][0] / 1e3, 1), "rel_err": rows[0][2], "best": rows[0][1],
                     "top5": [(round(u, 2), c) for u, c, _ in rows[:5]], "tried": len(rows)})


def gemlite_section(data: dict, ref: dict, out) -> None:
    """GemLite's A16W4 (bf16 in and out, group 128) on our int4 g128 tensors: fma (its default: w = q * scale +
    (-zero * scale), the zero folded in bf16) and exact ((q - zero) * scale, our arithmetic), batch 1, 16 and 64 by
    its own choice (GEMV_REVSPLITK at 1: split-K by atomic adds, so its rounding may vary run to run) and batch 1
    by its plain GEMV; the first call of each batch autotunes (or finds its shipped config of the card) outside the
    timed CUDA graph. (The exact rows reuse the launch shapes tuned for fma: the zero mode is not in GemLite's
    autotune key.)"""
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear
    except Exception as e:  # noqa: BLE001
        out({"kind": "failed", "kernel": "gemlite", "why": f"import: {e}"[:300]})
        return
    out({"kind": "env", "gemlite": getattr(gemlite, "__version__", "?")})
    for fma in (True, False):
        for lin, (N, K) in SHAPES.items():
            try:
                layers = []
                for t in data[lin]["int4"]:
                    g = GemLiteLinear(4, group_size=128, in_features=K, out_features=N, input_dtype=DType.BF16,
                                      output_dtype=DType.BF16)
                    g.pack(int4_wo.unpack(t["weight"]), t["scale"].to(torch.bfloat16), t["zero"].to(torch.bfloat16),
                           fma_mode=fma)
                    layers.append(g)
            except Exception as e:  # noqa: BLE001
                out({"kind": "failed", "kernel": "gemlite", "linear": lin, "fma": fma, "why": f"pack: {e}"[:300]})
                continue
            for M, how in ((1, "auto"), (1, "GEMV"), (16, "auto"), (64, "auto")):
                x, r = ref[lin, M]

                def call(g):
                    return g(x) if how == "auto" else g.forward_manual(x, how)
                try:
                    for g in layers:  # autotune / config lookup, outside the graph
                        call(g)
                    torch.cuda.synchronize()
                    err = rel(call(layers[0]), r["int4"])
                    us = time_graph(lambda: [call(g) for g in layers], 15) * 1e6 / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "kernel": "gemlite", "linear": lin, "M": M, "how": how, "fma": fma,
                         "why": str(e)[:300]})
                    continue
                out({"kind": "probe", "kernel": f"gemlite_{how.lower()}" + ("" if fma else "_exact"), "fmt": "int4_g128",
                     "linear": lin, "M": M, "us": round(us, 2), "GB_s": round(N * K / 2 / us / 1e3, 1), "rel_err": err})
            del layers


if __name__ == "__main__":
    main()
