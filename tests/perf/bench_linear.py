"""The linears of one LLaMA-2-7B layer, alone, per quant mode and batch: time, bytes read, ×bf16 (a
measurement on the GPU, not a test). And a launch-shape sweep of the Triton kernels per shape.

    python tests/perf/bench_linear.py --out OUT [--modes none,int8_wo,...] [--batches 1,8,64,512]
        [--kernels auto,library] [--sweep [--sweep_modes int4_wo_g128,int8_wo,sq_per_token_per_channel,fp8]]

Each mode's runtime linear (runtime.quant.make_linear, as an engine builds it) on random weights of the
four shapes of a layer (attn.qkv 12288x4096, attn.o 4096x4096, mlp.up 22016x4096, mlp.down 4096x11008),
COPIES distinct copies each so that the weights are several times the L2; every call of a shape replays
one CUDA graph of all copies (eager kernels, as captured in the decode graph; the engine's --compile also
fuses the elementwise work around them). The time is the median of REPS replays over the copies.
--kernels: each mode under each kernel choice, in the same call ($EF_WO_KERNEL auto / torch / triton, and
library: the W8A8 / FP8 linears on torch._int_mm / torch._scaled_mm at every batch).
--sweep: per mode of --sweep_modes and batch of --sweep_batches, each launch shape of its Triton kernel
(runtime/quant/triton_wo.py, triton_w8a8.py) in a small grid, per linear shape; the best next to the default.
--dry_run: on the CPU through Triton's interpreter (TRITON_INTERPRET=1), tiny shapes, nothing timed: that
every path runs, before GPU time is spent on it.
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
DEVICE = "cuda"  # --dry_run: "cpu", tiny shapes, each call made once and not timed (run with TRITON_INTERPRET=1)


def quantized(mode: str, shape, dtype, gen) -> dict:
    N, K = shape
    w = torch.randn(N, K, device=DEVICE, generator=gen, dtype=torch.float32) * 0.02
    if mode == "none":
        return {"weight": w.to(dtype)}
    stats = {"input_absmax": torch.full((K,), 4.0, device=DEVICE)}
    return {k: v.to(DEVICE) for k, v in MODES[mode].quantize(w, dtype, stats).items()}


def timed(fn, reps: int = REPS) -> float:
    """Median microseconds of one call of fn, replayed in a CUDA graph (runtime.bench_attention's timer)."""
    if DEVICE == "cpu":  # --dry_run
        fn()
        return 1.0
    return time_graph(fn, reps) * 1e6


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Variant:
    """A kernel choice while the linears are made and captured: auto | torch | triton ($EF_WO_KERNEL), or
    library (auto, with the W8A8 / FP8 linears on torch._int_mm / torch._scaled_mm at every size)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        import os

        from runtime.quant import triton_w8a8

        self.env, self.small = os.environ.get("EF_WO_KERNEL"), triton_w8a8.SMALL_M
        os.environ["EF_WO_KERNEL"] = "auto" if self.name == "library" else self.name
        if self.name == "library":
            triton_w8a8.SMALL_M = 0
        return self

    def __exit__(self, *exc):
        import os

        from runtime.quant import triton_w8a8

        triton_w8a8.SMALL_M = self.small
        if self.env is None:
            os.environ.pop("EF_WO_KERNEL", None)
        else:
            os.environ["EF_WO_KERNEL"] = self.env


def modes_table(args, out) -> None:
    dtype = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    base = {}
    for mode, variant in itertools.product(args.modes, args.kernels):
        if mode == "none" and variant != args.kernels[0]:
            continue  # cuBLAS: one kernel
        for lin, shape in SHAPES.items():
            with _Variant(variant):  # the linears are made, and their graphs captured, under the choice
                _time_linear(args, out, base, mode, variant, lin, shape, dtype, gen)
            _empty_cache()


def _time_linear(args, out, base, mode, variant, lin, shape, dtype, gen) -> None:
    try:
        stored = [quantized(mode, shape, dtype, gen) for _ in range(COPIES)]
        linears = [make_linear(mode, {f"l.{k}": v for k, v in t.items()}, "l") for t in stored]
    except Exception as e:  # noqa: BLE001 (a measurement: say it and go on)
        out({"kind": "failed", "mode": mode, "variant": variant, "linear": lin, "why": f"{type(e).__name__}: {e}"[:300]})
        return
    wbytes = nbytes(stored[0])
    for M in args.batches:
        x = torch.randn(M, shape[1], device=DEVICE, dtype=dtype)
        try:
            us = timed(lambda: [f(x) for f in linears]) / COPIES
        except Exception as e:  # noqa: BLE001
            out({"kind": "failed", "mode": mode, "variant": variant, "linear": lin, "M": M,
                 "why": f"{type(e).__name__}: {e}"[:300]})
            continue
        if mode == "none":
            base[lin, M] = us
        out({"kind": "linear", "mode": mode, "kernel": getattr(linears[0], "kernel", "cublas"), "variant": variant,
             "linear": lin, "N": shape[0], "K": shape[1], "M": M, "us": round(us, 2), "weight_bytes": wbytes,
             "GB_s": round(wbytes / us / 1e3, 1), "TFLOP_s": round(2 * M * shape[0] * shape[1] / us / 1e6, 1),
             "x_bf16": round(base[lin, M] / us, 3) if (lin, M) in base else None})


def _interleave(a: list, b: list) -> list:
    """a[0], b[0], a[1], b[1], ... then the rest of the longer."""
    return [x for pair in itertools.zip_longest(a, b) for x in pair if x is not None]


class _WeightOnly:
    """The weight-only Triton kernel (runtime/quant/triton_wo.py) for one mode: its operands, launch, default."""
    grids = {
        # MAGIC first (the integers to fp32 by bits), and every other entry the tensor-core GEMM with x padded to
        # 16 rows (the W8A8 GEMM read int8 weights faster at batch 1 than this GEMV, H100 2026-12-05; int4 with
        # JOIN, int8 plain): the budget may stop the grid before its end
        1: _interleave([{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "MAGIC": mg}
                        for mg, bk, sk, bn, nw in itertools.product((True, False), (256, 128, 64), (8, 4, 2, 1),
                                                                    (32, 64, 128, 16), (4, 8))],
                       [{"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": ns,
                         "JOIN": jn, "XSPLIT": False, "MAGIC": False, "NATURAL": False}
                        for bn, bk, sk, ns, jn in itertools.product((32, 64), (256, 128), (1, 2, 4), (4, 3),
                                                                    (True, False))]),
        # int4's variants (triton_wo._wo_kernel), innermost so that a budget cut leaves each the same shapes:
        # JOIN (x read as stored, the weight levels interleaved back: one dot) and XSPLIT (x read contiguously,
        # parted even / odd), each with and without MAGIC (nibbles to bf16 by bits), NATURAL (the weight tile as
        # stored) with and without MAGIC, plain; likelier shapes first (wide N tiles: x is re-read from L2 by every N tile)
        **{M: [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 8 if bm * bn > 8192 else 4,
                "num_stages": ns, "JOIN": jn, "XSPLIT": xs, "MAGIC": mg, "NATURAL": nat}
               for bn, bk, sk, ns, (jn, xs, mg, nat) in itertools.product(
                   (128, 64, 256), (128, 64), (2, 1, 4), (4, 3),
                   ((True, False, True, False), (True, False, False, False), (False, True, True, False),
                    (False, True, False, False), (False, False, True, True), (False, False, False, True),
                    (False, False, False, False)))]
           for M, bm in ((16, 16), (64, 64))},
    }
    # int8 at 16 and 64 rows: MAGIC (fp32 bits, bf16 its upper half: no conversions), plain, NATURAL; the
    # shapes of the W8A8 GEMM's best first (32 x 256 tiles, no split: 2.2-2.4 TB/s of the same int8 bytes at 64
    # rows, H100 2026-12-05), which this grid had never tried; a K split summed in the kernel (REDUCE) or after
    grids8 = {M: [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": ns,
                   "MAGIC": mg, "NATURAL": nat, "REDUCE": rd}
                  for bn, bk, (sk, rd), ns, (mg, nat) in itertools.product(
                      (32, 64, 128), (256, 128), ((1, False), (2, True), (2, False)), (4, 3),
                      ((True, False), (False, False), (False, True)))]
              for M, bm in ((16, 16), (64, 64))}

    # SWAP (out^T = W x^T: the converted weight tile is the wgmma's left operand, from registers; as stored, one
    # trip through shared memory instead of two; tests/perf/aot_inspect.py) first at 16 and 64 rows, int8 and int4:
    # the weight rows on the MMA's 64-row side; at batch 1 too (x padded to 16 rows: the weight tiles then stream
    # through cp.async stages, which the GEMV's plain loads do not)
    swap = {M: [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": ns,
                 "SWAP": True, "MAGIC": True, "REDUCE": sk > 1}
                for bn, bk, sk, ns in itertools.product((128, 64), (128, 256), (1, 2) if M > 1 else (1, 2, 4), (4, 3))]
            for M, bm in ((1, 16), (16, 16), (64, 64))}

    # int4 at batch 1: the GEMV with tiles of several whole groups first (1,024 features: 512 bytes of each row
    # a step, as int8's best), MAGIC, K splits summed in the kernel; then the grid above
    gemv4 = [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "MAGIC": True, "REDUCE": True}
             for bk, sk, bn, nw in itertools.product((1024, 512), (1, 2, 4), (32, 16, 64), (8, 4))]

    # batch 1 first of all: the GEMV with the weight tiles of one or two steps ahead in flight (PREFETCH), around
    # the default shapes (int8 per channel 32 x 512, 8 warps; int4 32 x 512, 4 warps, K split 4 added in the kernel)
    ahead = {8: [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": 512, "SPLIT_K": sk, "num_warps": nw, "MAGIC": True,
                  "REDUCE": sk > 1, "PREFETCH": pf}
                 for pf, sk, bn, nw in itertools.product((2, 1), (1, 2), (32, 16), (8, 4))],
             4: [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": 512, "SPLIT_K": sk, "num_warps": nw, "MAGIC": True,
                  "REDUCE": sk > 1, "PREFETCH": pf}
                 for pf, sk, bn, nw in itertools.product((2, 1), (4, 2), (32, 16), (4, 8))]}

    # batch 1 before all: the GEMV's levels by byte permutes (PRMT; int8 16 x 1024 the H100's best of 2026-12-07, now
    # the default; int4 not yet swept, its loop in sm90 SASS 15-35% shorter than with MAGIC's shifts and masks), at
    # the default shapes and around them, with and without tiles fetched ahead
    prmt = {8: [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "MAGIC": True,
                 "REDUCE": sk > 1, "PREFETCH": pf, "PRMT": True}
                for bn, bk, sk, nw, pf in [(16, 512, 1, 8, 1), (16, 512, 1, 8, 0), (32, 512, 1, 8, 0), (16, 512, 1, 4, 0),
                                           (16, 1024, 1, 8, 0), (32, 256, 1, 4, 0), (16, 512, 2, 8, 0),
                                           (32, 512, 2, 8, 0)]],
            4: [{"GEMV": True, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "MAGIC": True,
                 "REDUCE": sk > 1, "PREFETCH": pf, "PRMT": True}
                for bn, bk, sk, nw, pf in [(32, 512, 4, 4, 0), (32, 512, 2, 4, 0), (64, 512, 4, 8, 0), (16, 1024, 4, 4, 0),
                                           (32, 1024, 2, 8, 0), (32, 512, 4, 4, 1), (16, 512, 4, 4, 0),
                                           (32, 512, 1, 4, 0)]]}

    def __init__(self, mode: str, bits: int):
        self.mode, self.bits = mode, bits
        grids = {**self.grids, **self.grids8} if bits == 8 else {**self.grids, 1: self.gemv4 + self.grids[1]}
        # int8 with MAGIC; int4 with and without it (its MAGIC in the tile as stored is new on 2026-12-07: untimed)
        swap = {M: [{**c, "MAGIC": mg} for c in cfgs for mg in ((True,) if bits == 8 else (True, False))]
                for M, cfgs in self.swap.items()}
        self.grids = {M: swap.get(M, []) + grid for M, grid in grids.items()}
        self.grids[1] = self.prmt[bits] + self.ahead[bits] + self.grids[1]

    def operands(self, shape, dtype, gen, M):
        t = quantized(self.mode, shape, dtype, gen)
        return t, torch.randn(M, shape[1], device=DEVICE, dtype=dtype)

    def _group(self, t, shape):
        return shape[1] // (t["scale"].numel() // shape[0])

    def default(self, t, shape, M, sms):
        from runtime.quant import triton_wo

        return triton_wo.default_config(M, shape[0], shape[1], self._group(t, shape), sms, self.bits)

    def fits(self, t, shape, cfg):
        if self.bits == 8 and (cfg.get("XSPLIT") or cfg.get("JOIN")):
            return False  # int4's
        if cfg.get("GEMV"):  # the weight tile in registers, as fp32 (int4: its two halves): spills past 128 a thread
            if cfg["BLOCK_N"] * cfg["BLOCK_K"] > 128 * 32 * cfg.get("num_warps", 4):
                return False
        else:  # shared memory a stage: x (16-bit) and the weight tile; 200 of the 227 KiB an SM has on Hopper
            stage = cfg["BLOCK_K"] * (2 * cfg["BLOCK_M"] + cfg["BLOCK_N"] * self.bits // 8)
            if stage * cfg.get("num_stages", 3) > 200 * 1024:
                return False
        g = self._group(t, shape)  # per channel (g == K) a tile may end past K (masked); groups must hold tiles,
        # or the GEMV's tiles whole groups
        whole = bool(cfg.get("GEMV")) and not cfg["BLOCK_K"] % g
        return (g == shape[1] or not g % cfg["BLOCK_K"] or whole) and cfg["BLOCK_K"] * cfg["SPLIT_K"] <= shape[1]

    def launch(self, t, x, cfg):
        from runtime.quant import triton_wo

        return triton_wo.launch(x, t["weight"], t["scale"], t.get("zero"), self.bits, **cfg)

    def engine(self, t, x):
        """torch's tinygemm at this size (int4 in bf16 up to TINYGEMM_UP_TO rows), as the engine feeds it
        (triton_wo.tinygemm_operands), as a callable; else None. The engine runs it at batches 2-16 (and 1 where
        PRMT does not run); at batch 1 it is the baseline our GEMV's launch shapes are timed against."""
        from runtime.quant import triton_wo

        M = x.shape[0]
        if self.bits != 4 or x.dtype != torch.bfloat16 or M > triton_wo.TINYGEMM_UP_TO:
            return None
        tiny = triton_wo.tinygemm_operands(t["weight"], t["scale"], t["zero"])
        if tiny is None:
            return None
        packed, scale_offset, group = tiny
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, scale_offset)


class _W8A8:
    """The W8A8 / E4M3 Triton GEMM (runtime/quant/triton_w8a8.py) for sq (per token, per channel) or fp8, on
    inputs quantized beforehand (as the linears do, a fused elementwise pass under --compile)."""
    grids = {M: [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "num_stages": ns}
                 for bn, bk, sk, nw, ns in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (4,), (3, 4))]
             for M, bm in ((1, 16), (16, 16), (64, 64))}

    def __init__(self, mode: str):
        self.mode = mode

    def operands(self, shape, dtype, gen, M):
        from runtime.quant.fp8 import to_e4m3

        t = quantized(self.mode, shape, dtype, gen)
        x = torch.randn(M, shape[1], device=DEVICE, dtype=dtype)
        if self.mode == "fp8":
            return {**t, "x_scale": t["input_scale"]}, to_e4m3(x, t["input_scale"])
        a = x.float().abs().amax(-1, keepdim=True) / 127
        return {**t, "x_scale": a}, torch.round(x.float() / a).clamp(-127, 127).to(torch.int8)

    def default(self, t, shape, M, sms):
        from runtime.quant import triton_w8a8

        return triton_w8a8.default_config(M, shape[0], shape[1], sms, self.mode == "fp8")

    def fits(self, t, shape, cfg):
        return cfg["BLOCK_K"] * cfg["SPLIT_K"] <= shape[1]

    def launch(self, t, x, cfg):
        from runtime.quant import triton_w8a8

        return triton_w8a8.launch(x, t["weight"], t["x_scale"], t["weight_scale"], torch.bfloat16, **cfg)


SWEPT = {"int4_wo_g128": _WeightOnly("int4_wo_g128", 4), "int8_wo": _WeightOnly("int8_wo", 8),
         "sq_per_token_per_channel": _W8A8("sq_per_token_per_channel"), "fp8": _W8A8("fp8")}


def sweep(args, out) -> None:
    """Per (kernel, batch): every launch shape of its grid on every linear shape (config outside, shapes
    inside: a launch shape compiles once for all shapes), against the default; within --sweep_s."""
    dtype = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 132
    pairs = [(mode, M) for mode in args.sweep_modes for M in args.sweep_batches if M in SWEPT[mode].grids]
    t_next = time.time()
    for mode, M in pairs:  # each (mode, batch) gets its share of --sweep_s, in the order given
        k, grid = SWEPT[mode], SWEPT[mode].grids[M]
        t_next += args.sweep_s / len(pairs)
        t_end = t_next  # this pair's deadline
        ops = {lin: [k.operands(shape, dtype, gen, M) for _ in range(COPIES)] for lin, shape in SHAPES.items()}
        res = {lin: [] for lin in SHAPES}  # (us, cfg)
        defaults = {lin: k.default(ops[lin][0][0], shape, M, sms) for lin, shape in SHAPES.items()}
        for cfg in [None, *grid]:
            if cfg is not None and time.time() > t_end:  # the default is always timed
                break
            for lin, shape in SHAPES.items():
                c = defaults[lin] if cfg is None else cfg
                if not k.fits(ops[lin][0][0], shape, c):
                    continue
                try:
                    us = timed(lambda: [k.launch(t, x, c) for t, x in ops[lin]], reps=7) / COPIES
                except Exception as e:  # noqa: BLE001
                    out({"kind": "sweep_error", "mode": mode, "M": M, "cfg": c, "why": f"{type(e).__name__}: {e}"[:200]})
                    break
                res[lin].append((us, "default" if cfg is None else c))
        engine = {}  # torch's tinygemm where it applies (int4 in bf16 up to 16 rows), timed alike
        for lin in SHAPES:
            runs = [getattr(k, "engine", lambda t, x: None)(t, x) for t, x in ops[lin]]
            if all(runs):
                engine[lin] = timed(lambda: [run() for run in runs], reps=7) / COPIES
        for lin, shape in SHAPES.items():
            ok = sorted(res[lin], key=lambda r: r[0])
            if not ok:
                continue
            d = next((u for u, c in res[lin] if c == "default"), None)
            wbytes = nbytes({n: v for n, v in ops[lin][0][0].items() if n != "x_scale"})
            out({"kind": "sweep", "mode": mode, "linear": lin, "M": M, "tried": len(res[lin]),
                 "default": defaults[lin], "default_us": round(d, 2) if d else None,
                 "default_GB_s": round(wbytes / d / 1e3, 1) if d else None, "best_us": round(ok[0][0], 2),
                 "best": ok[0][1], "best_GB_s": round(wbytes / ok[0][0] / 1e3, 1),
                 "top5": [(round(u, 2), c) for u, c in ok[:5]], "all": [(round(u, 2), c) for u, c in res[lin]],
                 **({"engine_us": round(engine[lin], 2)} if lin in engine else {})})
        del ops
        _empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", default="none,int8_wo,int4_wo_g128,int4_wo,sq_per_token_per_channel,sq_per_channel,fp8")
    ap.add_argument("--batches", default="1,8,64,512")
    ap.add_argument("--kernels", default="auto",
                    help="comma list of auto, torch, triton ($EF_WO_KERNEL) and library (auto with the W8A8 / FP8 "
                         "linears on torch._int_mm / _scaled_mm at every size): each mode under each")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dry_run", action="store_true", help="on the CPU, tiny shapes, nothing timed: does it run")
    ap.add_argument("--sweep_s", type=float, default=150)
    ap.add_argument("--sweep_batches", default="1,64", help="of 1, 16, 64; each (mode, batch) gets an equal share of "
                    "--sweep_s, in the order given")
    ap.add_argument("--sweep_modes", default="int4_wo_g128,int8_wo", help=f"of {', '.join(SWEPT)}")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m and m != "-"]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.kernels = args.kernels.split(",")
    args.sweep_batches = [int(b) for b in args.sweep_batches.split(",")]
    args.sweep_modes = args.sweep_modes.split(",")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sink = open(Path(args.out) / "linear.jsonl", "a")

    def out(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    if args.dry_run:
        global DEVICE, SHAPES, COPIES
        DEVICE, COPIES = "cpu", 1
        SHAPES = {"attn.qkv": (96, 256), "mlp.down": (64, 512)}
        for k in SWEPT.values():  # two launch shapes of each grid
            k.grids = {M: grid[:2] for M, grid in k.grids.items()}
    out({"kind": "env", "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
         "torch": torch.__version__})
    if args.modes:
        modes_table(args, out)
    if args.sweep:
        sweep(args, out)


if __name__ == "__main__":
    main()
