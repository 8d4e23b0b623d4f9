"""Compile the weight-only kernels (runtime/quant/triton_wo.py) for a GPU target without a GPU, and say what
the machine code does: registers, spills, shared memory, the width of its global loads, whether loads are
pipelined (cp.async / TMA), whether tensor-core MMAs take an operand from registers or both from shared
memory, and the SASS of the K loop (warp-instructions a weight byte: the issue bound, loop_body). For deciding what is worth device time, not a benchmark.

    python tests/perf/aot_inspect.py [--target cuda:90] [--grid gemv|gemm|gluon|all]

Integer arguments get Triton's divisibility-by-16 hint, as its JIT gives them at run time for our shapes.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import runtime.quant.triton_wo as wo  # noqa: E402

GEMV_ARGS = ["X", "W", "SCALE", "ZERO", "OUT", "PART", "LOCKS", "NORM", "RES", "N", "K", "G", "stride_wn", "eps"]
GEMM_ARGS = ["X", "W", "SCALE", "ZERO", "OUT", "PART", "LOCKS", "M", "N", "K", "G", "stride_xm", "stride_wn",
             "stride_om"]
TYPES = {"X": "*bf16", "SCALE": "*fp32", "ZERO": "*i8", "OUT": "*bf16", "PART": "*fp32", "LOCKS": "*i32",
         "NORM": "*bf16", "RES": "*bf16", "eps": "fp32"}
GEMV_PLAIN = {"PRO": 0, "KP": 1, "RESID": False}  # the GEMV's fusions off (launch's norm, gate, residual)


@triton.jit
def _copy16(X, Y):
    tl.store(Y + tl.arange(0, 16), tl.load(X + tl.arange(0, 16)))


def cannot_compile(target) -> str | None:
    """Why this triton cannot compile for target at all (no NVIDIA backend, no ptxas), or None when it can."""
    try:
        triton.compile(ASTSource(fn=_copy16, signature={"X": "*fp32", "Y": "*fp32"}, constexprs={}), target=target,
                       options=triton.compiler.make_backend(target).parse_options({}).__dict__)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:200]
    return None


def compile_kernel(fn, args, consts, warps, stages, target):
    if fn is wo._wo_gemv_kernel:
        consts = {**GEMV_PLAIN, **consts}
    sig = {a: TYPES.get(a, "*u8" if consts.get("INT4") else "*i8") if a in TYPES or a == "W" else "i32" for a in args}
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in args if a not in ("G", "eps")}
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options({"num_warps": warps, "num_stages": stages})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                          options=opts.__dict__)


def loop_body(sass: str) -> Counter:
    """Opcodes of the longest loop in cuobjdump's SASS (from a backward branch's target to the branch): the K loop,
    run once a tile. Its warp-instructions a tile over the tile's weight bytes bound the kernel by issue: an SM
    issues 4 a cycle, so at 0.35 a byte an H100 (132 SMs, 1.98 GHz) can read no more than ~3 TB/s however its
    memory system keeps up, and at the ~60% issue efficiency such loops reach, ~1.8."""
    rows = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(0x[0-9a-f]+)?\s*;", sass)
    best: list = []
    for at, op, target in rows:
        if op == "BRA" and target and int(target, 16) < int(at, 16):
            body = [o for a, o, _ in rows if int(target, 16) <= int(a, 16) <= int(at, 16)]
            best = body if len(body) > len(best) else best
    return Counter(best)


def describe(k, warps: int = 4, tile_bytes: int = 0) -> dict:
    """tile_bytes: the weight bytes of one K step of one program, for the loop's warp-instructions a byte."""
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    body = loop_body(sass)
    loop = {"loop_sass": sum(body.values()), "loop_top": dict(body.most_common(6))}
    if tile_bytes:
        loop["warp_instr_per_byte"] = round(sum(body.values()) * warps / tile_bytes, 3)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res)
    loads = Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx))
    mma = Counter()
    for w in re.finditer(r"wgmma\.mma_async[^;]*;", ptx, re.S):  # A from registers: a {..} list second
        parts = " ".join(w.group(0).split())
        mma["wgmma A in registers" if re.match(r"wgmma\S+ \{[^}]*\}, \{", parts) else "wgmma A in shared"] += 1
    mma["mma.sync"] = ptx.count("mma.sync")
    return {"regs": int(m.group(1)) if m else None, "stack": int(m.group(2)) if m else None,
            "smem": k.metadata.shared, "loads": dict(loads), "cp.async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "tma": ptx.count("cp.async.bulk"), **{k: v for k, v in mma.items() if v}, **loop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda:90")
    ap.add_argument("--grid", default="all", choices=["gemv", "gemm", "gluon", "all"])
    a = ap.parse_args()
    backend, arch = a.target.split(":")
    target = GPUTarget(backend, int(arch), 32)
    base = dict(HAS_ZERO=False, REDUCE=False, EVEN_K=True)
    if a.grid in ("gemv", "all"):
        for bits, group, bn, bk, warps, ng, ahead in [
                (8, 4096, 32, 512, 8, 1, 0), (8, 4096, 32, 512, 8, 1, 1), (8, 4096, 32, 512, 8, 1, 2),
                (8, 4096, 16, 512, 8, 1, 0), (8, 4096, 16, 512, 8, 1, 1), (8, 4096, 16, 512, 8, 1, 2),
                (8, 4096, 32, 256, 4, 1, 0), (8, 4096, 16, 1024, 8, 1, 0), (8, 4096, 16, 1024, 8, 1, 2),
                (4, 128, 128, 128, 4, 1, 0), (4, 128, 32, 1024, 8, 8, 0), (4, 128, 32, 512, 4, 4, 0),
                (4, 128, 32, 512, 4, 4, 2), (4, 128, 64, 512, 8, 4, 0)]:
            for prmt, pro, resid in ((False, 0, False), (True, 0, False), (True, 1, False), (True, 2, True)):
                # the levels by MAGIC's shifts and masks, or by byte permutes; the fusions (PRO 1: the norm, 2: the
                # gate; RESID: the residual add) on PRMT
                consts = dict(base, GROUP=group, INT4=bits == 4, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, MAGIC=True, NG=ng,
                              PREFETCH=ahead, PRMT=prmt, PRO=pro, KP=4096 if pro == 1 else 1, RESID=resid)
                k = compile_kernel(wo._wo_gemv_kernel, GEMV_ARGS, consts, warps, 3, target)
                print(f"gemv int{bits} g{group} {bn}x{bk} w{warps} NG{ng} prefetch {ahead} prmt={prmt} pro={pro} "
                      f"resid={resid}", describe(k, warps, bn * bk * bits // 8))
    if a.grid in ("gemm", "all"):
        for bits, group, bm, bn, bk, warps, stages, magic, natural, swap in [
                (8, 4096, 64, 64, 128, 4, 3, False, False, False), (8, 4096, 64, 64, 128, 4, 3, True, False, False),
                (8, 4096, 64, 32, 256, 4, 4, True, False, False), (8, 4096, 64, 64, 128, 4, 3, False, True, False),
                (8, 4096, 64, 64, 128, 4, 3, True, True, True), (8, 4096, 16, 128, 128, 4, 4, True, True, True),
                (4, 128, 64, 64, 128, 4, 3, False, False, False), (4, 128, 64, 64, 128, 4, 3, True, False, False),
                (4, 128, 64, 64, 128, 4, 3, False, True, True), (4, 128, 16, 128, 128, 4, 4, False, True, True),
                (4, 128, 64, 64, 128, 4, 3, True, True, True), (4, 128, 16, 128, 128, 4, 4, True, True, True)]:
            consts = dict(base, GROUP=group, INT4=bits == 4, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          SPLIT_K=1, NATURAL=natural, MAGIC=magic, XSPLIT=False, JOIN=False, SWAP=swap)
            k = compile_kernel(wo._wo_kernel, GEMM_ARGS, consts, warps, stages, target)
            print(f"gemm int{bits} g{group} {bm}x{bn}x{bk} w{warps} s{stages} magic={magic} natural={natural} "
                  f"swap={swap}", describe(k, warps, bn * bk * bits // 8))


    if a.grid in ("gluon", "all"):  # runtime/quant/gluon_int4.py (Triton 3.6's Gluon API: the GPU machine's)
        gluon_grid(target)


def gluon_grid(target) -> None:
    """The Gluon int4 MMA GEMV: a 128-k group a loop, BN rows of weights (BN * 64 bytes) a program."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from runtime.quant import gluon_int4

    args = ["X", "WP", "SZ", "XS", "OUT", "M", "N", "K", "stride_xm"]
    types = {"X": "*bf16", "WP": "*i32", "SZ": "*fp32", "XS": "*fp32", "OUT": "*fp32"}
    for bn, split, warps, zero, ahead in [(64, 1, 4, True, 0), (64, 1, 4, True, 1), (64, 1, 4, True, 2),
                                          (128, 1, 4, True, 0), (128, 1, 4, False, 0), (128, 4, 8, True, 1),
                                          (128, 1, 4, True, 2), (256, 1, 4, True, 0)]:
        consts = dict(BN=bn, SPLIT_K=split, NW=warps, HAS_ZERO=zero, PREFETCH=ahead)
        sig = {**{x: types.get(x, "i32") for x in args}, **{k: "constexpr" for k in consts}}
        attrs = {(args.index(x),): [["tt.divisibility", 16]] for x in args if x != "M"}
        opts = triton.compiler.make_backend(target).parse_options({"num_warps": warps})
        try:
            k = triton.compile(GluonASTSource(fn=gluon_int4.wo_int4_mma_kernel, signature=sig, constexprs=consts,
                                              attrs=attrs), target=target, options=opts.__dict__)
        except Exception as e:  # noqa: BLE001 (another Triton's Gluon API: written against 3.6)
            print(f"gluon int4 BN{bn} split{split} w{warps} zero={zero} ahead {ahead}: cannot compile here: "
                  f"{str(e)[:200]}")
            continue
        print(f"gluon int4 BN{bn} split{split} w{warps} zero={zero} ahead {ahead}", describe(k, warps, bn * 128 // 2))


if __name__ == "__main__":
    main()
