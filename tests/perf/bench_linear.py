"""The linears of one LLaMA-2-7B layer, alone, per quant mode and batch: time, bytes read, ×bf16 (a
measurement on the GPU, not a test). And a launch-shape sweep of the weight-only Triton kernel per shape.

    python tests/perf/bench_linear.py --out OUT [--modes none,int8_wo,...] [--batches 1,8,64,512] [--sweep]

Each mode's runtime linear (runtime.quant.make_linear, as an engine builds it) on random weights of the
four shapes of a layer (attn.qkv 12288x4096, attn.o 4096x4096, mlp.up 22016x4096, mlp.down 4096x11008),
COPIES distinct copies each so that the weights are several times the L2; every call of a shape replays
one CUDA graph of all copies (eager kernels, as captured in the decode graph; the engine's --compile also
fuses the elementwise work around them). The time is the median of REPS replays over the copies.
--sweep: for int8_wo and int4_wo_g128 at batch 1 and 64, each launch shape of runtime/quant/triton_wo.py
in a small grid, per linear shape; the best next to the default; and bf16 weights through its batch-1
GEMV kernel (to set against cuBLAS's bf16 GEMV in the table).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.bench_attention import time_graph  # noqa: E402
from runtime.quant import MODES, make_linear  # noqa: E402

SHAPES = {"attn.qkv": (12288, 4096), "attn.o": (4096, 4096), "mlp.up": (22016, 4096), "mlp.down": (4096, 11008)}
COPIES, REPS = 4, 15


def quantized(mode: str, shape, dtype, gen) -> dict:
    N, K = shape
    w = torch.randn(N, K, device="cuda", generator=gen, dtype=torch.float32) * 0.02
    if mode == "none":
        return {"weight": w.to(dtype)}
    stats = {"input_absmax": torch.full((K,), 4.0, device="cuda")}
    return {k: v.cuda() for k, v in MODES[mode].quantize(w, dtype, stats).items()}


def timed(fn, reps: int = REPS) -> float:
    """Median microseconds of one call of fn, replayed in a CUDA graph (runtime.bench_attention's timer)."""
    return time_graph(fn, reps) * 1e6


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def modes_table(args, out) -> None:
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = {}
    for mode in args.modes:
        for lin, shape in SHAPES.items():
            try:
                stored = [quantized(mode, shape, dtype, gen) for _ in range(COPIES)]
                linears = [make_linear(mode, {f"l.{k}": v for k, v in t.items()}, "l") for t in stored]
            except Exception as e:  # noqa: BLE001 (a measurement: say it and go on)
                out({"kind": "failed", "mode": mode, "linear": lin, "why": f"{type(e).__name__}: {e}"[:300]})
                continue
            wbytes = nbytes(stored[0])
            for M in args.batches:
                x = torch.randn(M, shape[1], device="cuda", dtype=dtype)
                try:
                    us = timed(lambda: [f(x) for f in linears]) / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "failed", "mode": mode, "linear": lin, "M": M, "why": f"{type(e).__name__}: {e}"[:300]})
                    continue
                if mode == "none":
                    base[lin, M] = us
                kernel = getattr(linears[0], "kernel", "cublas")
                out({"kind": "linear", "mode": mode, "kernel": kernel, "linear": lin, "N": shape[0], "K": shape[1],
                     "M": M, "us": round(us, 2), "weight_bytes": wbytes, "GB_s": round(wbytes / us / 1e3, 1),
                     "TFLOP_s": round(2 * M * shape[0] * shape[1] / us / 1e6, 1),
                     "x_bf16": round(base[lin, M] / us, 3) if (lin, M) in base else None})
            del stored, linears
            torch.cuda.empty_cache()


def sweep(args, out) -> None:
    """Per (mode, batch): every launch shape of the grid on every linear shape (config outside, shapes
    inside: a launch shape compiles once for all shapes), against the default; within --sweep_s."""
    from runtime.quant import triton_wo

    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = {
        1: [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw}
            for bn, bk, sk, nw in itertools.product((32, 64, 128, 16), (128, 256, 512, 64), (1, 2, 4, 8), (4, 8))],
        64: [{"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "num_stages": ns}
             for bn, bk, sk, nw, ns in itertools.product((32, 64, 128), (64, 128), (1, 2, 4, 8), (4,), (3, 4))],
    }
    t_end = time.time() + args.sweep_s
    for mode, bits in (("int4_wo_g128", 4), ("int8_wo", 8)):
        stored = {lin: [quantized(mode, shape, dtype, gen) for _ in range(COPIES)] for lin, shape in SHAPES.items()}
        for M, grid in grids.items():
            if M not in args.sweep_batches:
                continue
            xs = {lin: torch.randn(M, shape[1], device="cuda", dtype=dtype) for lin, shape in SHAPES.items()}
            res = {lin: [] for lin in SHAPES}  # (us, cfg)
            defaults = {}
            for lin, shape in SHAPES.items():
                group = shape[1] // (stored[lin][0]["scale"].numel() // shape[0])
                defaults[lin] = triton_wo.default_config(M, shape[0], shape[1], group, sms, bits)
            for cfg in [None, *grid]:
                if time.time() > t_end:
                    break
                for lin, shape in SHAPES.items():
                    c = defaults[lin] if cfg is None else cfg
                    group = shape[1] // (stored[lin][0]["scale"].numel() // shape[0])
                    if group % c["BLOCK_K"] or c["BLOCK_K"] * c["SPLIT_K"] > shape[1]:
                        continue
                    x = xs[lin]
                    try:
                        us = timed(lambda: [triton_wo.launch(x, t["weight"], t["scale"], t.get("zero"), bits, **c)
                                            for t in stored[lin]], reps=7) / COPIES
                    except Exception as e:  # noqa: BLE001
                        out({"kind": "sweep_error", "mode": mode, "M": M, "cfg": c, "why": f"{type(e).__name__}: {e}"[:200]})
                        break
                    res[lin].append((us, "default" if cfg is None else c))
            for lin, shape in SHAPES.items():
                ok = sorted(res[lin], key=lambda r: r[0])
                if not ok:
                    continue
                d = next((u for u, c in res[lin] if c == "default"), None)
                wbytes = nbytes(stored[lin][0])
                out({"kind": "sweep", "mode": mode, "linear": lin, "M": M, "tried": len(res[lin]),
                     "default": defaults[lin], "default_us": round(d, 2) if d else None,
                     "default_GB_s": round(wbytes / d / 1e3, 1) if d else None, "best_us": round(ok[0][0], 2),
                     "best": ok[0][1], "best_GB_s": round(wbytes / ok[0][0] / 1e3, 1),
                     "top5": [(round(u, 2), c) for u, c in ok[:5]]})
        del stored
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", default="none,int8_wo,int4_wo_g128,int4_wo,sq_per_token_per_channel,sq_per_channel,fp8")
    ap.add_argument("--batches", default="1,8,64,512")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep_s", type=float, default=150)
    ap.add_argument("--sweep_batches", default="1,64", help="of 1, 64")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m and m != "-"]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sweep_batches = [int(b) for b in args.sweep_batches.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sink = open(Path(args.out) / "linear.jsonl", "a")

    def out(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    out({"kind": "env", "device": torch.cuda.get_device_name(), "torch": torch.__version__})
    if args.modes:
        modes_table(args, out)
    if args.sweep:
        sweep(args, out)


if __name__ == "__main__":
    main()
