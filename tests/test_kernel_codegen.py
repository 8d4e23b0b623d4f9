"""What the weight-only kernels compile to for a Hopper GPU (sm90), checked on a machine without one:
Triton's NVIDIA backend and its ptxas come with the triton wheel (tests/perf/aot_inspect.py says more).

Until 2026-12-07 the int4 kernels loaded their weights one byte a load (a K mask on the feature index 2j, which
the compiler cannot prove constant over a vector), and the int4 GEMM's weight tile was not pipelined: 0.5-0.7 TB/s
on an H100 where the same kernel with 16-byte loads reads ~1.3. These tests keep the loads wide."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).parent / "perf"

SCALAR_BYTE_LOAD = re.compile(r"ld\.global(?:\.[a-z0-9]+)*\.[bsu]8\b")


# name: (kernel, bits, group, even_k, warps, BLOCK_N, BLOCK_K); symmetric (no zero points, loaded a byte each):
# the weight tile is what the kernels load as bytes
CASES = {
    **{f"gemv_{name}_{kind}": ("gemv", bits, group, even, warps, 32, 512)
       for name, bits, group, warps in (("int4_g128", 4, 128, 4), ("int4_channel", 4, 4096, 4), ("int8_channel", 8, 4096, 8))
       for kind, even in (("whole_tiles", True), ("masked_K", False))},
    # the weight tiles of one or two steps ahead in flight (PREFETCH): their loads as wide, no spills; int8's batch-1
    # default for 4,096-wide linears (16 x 512, 8 warps, one ahead) with a partial last tile (mlp.down's K 11008)
    **{f"gemv_ahead2_{name}": ("gemv_ahead2", bits, group, True, warps, 32, 512)
       for name, bits, group, warps in (("int4_g128", 4, 128, 4), ("int8_channel", 8, 4096, 8))},
    "gemv_ahead1_int8_channel_default_masked_K": ("gemv_ahead1", 8, 4096, False, 8, 16, 512),
    "gemv_ahead1_int4_g128_masked_K": ("gemv_ahead1", 4, 128, False, 4, 32, 512),
    # the levels by byte permutes (PRMT: inline PTX, packs of four bytes): its weight loads as wide
    "gemv_prmt_int8_channel_masked_K": ("gemv_prmt", 8, 4096, False, 8, 32, 512),
    "gemv_prmt_int4_g128": ("gemv_prmt", 4, 128, True, 4, 32, 512),
    # the batch-1 fusions ($EF_WO_FUSE=1) on the int8 and int4 defaults: the norm's row (KP 4096) and the gate's two
    # halves loaded beside the weights, which stay as wide
    "gemv_prmt_norm_int8_channel_masked_K": ("gemv_prmt_norm", 8, 4096, False, 8, 16, 1024),
    "gemv_prmt_gate_resid_int8_channel_masked_K": ("gemv_prmt_gate", 8, 4096, False, 8, 16, 1024),
    "gemv_prmt_norm_int4_g128": ("gemv_prmt_norm", 4, 128, True, 4, 32, 512),
    "gemv_prmt_gate_resid_int4_g128": ("gemv_prmt_gate", 4, 128, True, 4, 32, 512),
    **{f"gemm_{name}_{kind}": ("gemm", bits, group, even, 4, 64, 128)
       for name, bits, group in (("int4_g128", 4, 128), ("int8_channel", 8, 4096))
       for kind, even in (("whole_tiles", True), ("masked_K", False))},
    **{f"gemm_swap_{name}": ("gemm_swap", bits, group, True, 4, 128, 128)
       for name, bits, group in (("int4_g128", 4, 128), ("int8_channel", 8, 4096))},
    "gemm_swap_int8_channel_default_64_rows": ("gemm_swap", 8, 4096, True, 4, 64, 128),  # (its K split: trace_probe)
    "gemm_swap_magic_int4_g128_64_rows": ("gemm_swap_magic", 4, 128, True, 4, 64, 128),  # nibbles to bf16 by bits
}

_PROBE = """
import json, sys
import aot_inspect as a
out = {}
for name, (kind, bits, group, even, warps, bn, bk) in json.loads(sys.argv[1]).items():
    c = dict(HAS_ZERO=False, REDUCE=False, EVEN_K=even, GROUP=group, INT4=bits == 4, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
             MAGIC=kind.startswith("gemv"))
    if kind.startswith("gemv"):
        fn, args, c = a.wo._wo_gemv_kernel, a.GEMV_ARGS, dict(c, NG=max(1, bk // group),
                                                               PREFETCH={"gemv_ahead1": 1, "gemv_ahead2": 2}.get(kind, 0),
                                                               PRMT="prmt" in kind, PRO=1 if kind.endswith("norm")
                                                               else 2 if kind.endswith("gate") else 0,
                                                               KP=4096 if kind.endswith("norm") else 1,
                                                               RESID=kind.endswith("gate"))
    else:
        swap = kind.startswith("gemm_swap")
        fn, args, c = a.wo._wo_kernel, a.GEMM_ARGS, dict(c, IEEE=False, BLOCK_M=64, NATURAL=swap, XSPLIT=False,
                                                          JOIN=False, SWAP=swap,
                                                          MAGIC=swap and (bits == 8 or kind.endswith("magic")))
    out[name] = a.describe(a.compile_kernel(fn, args, c, warps, 3, a.GPUTarget("cuda", 90, 32)))
print(json.dumps(out))
"""


def _probe(args: list[str]) -> list[str]:
    """Run a probe in a fresh process (the tests' TRITON_INTERPRET=1 would give the interpreter): its stdout lines;
    skips where this triton cannot compile for sm90 at all."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (`make test` installs it; or pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = "import aot_inspect as a; print(a.cannot_compile(a.GPUTarget('cuda', 90, 32)) or '')"
    why = subprocess.run([sys.executable, "-c", probe], cwd=str(PERF), env=env, capture_output=True, text=True,
                         timeout=300)
    if why.returncode == 0 and why.stdout.strip():  # a triton without its NVIDIA backend or ptxas
        pytest.skip("this triton has no working NVIDIA backend / ptxas to compile for sm90 (the triton wheel from "
                    f"PyPI has both): {why.stdout.strip()}")
    p = subprocess.run([sys.executable, *args], cwd=str(PERF), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"compiling our kernels for sm90 failed:\n{p.stderr[-3000:]}"  # our code, not the tools
    return p.stdout.strip().splitlines()


@pytest.fixture(scope="module")
def compiled() -> dict:
    """describe() of every case."""
    return json.loads(_probe(["-c", _PROBE, json.dumps(CASES)])[-1])


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gemv")])
def test_gemv_loads_weights_in_vectors(compiled, name):
    d = compiled[name]
    kind, bits, _, _, warps, bn, bk = CASES[name]
    wide = sum(n for op, n in d["loads"].items() if ".v4." in op or ".v2." in op)
    # a thread's share of the weight tile (bn x bk levels, int4 half the bytes) in 8- or 16-byte loads, never bytes;
    # fetched ahead: the loads of the tiles before the loop besides the loop's own; and x's (a tile's features as
    # stored, one vector load or none, where the compiler keeps it in scalar loads)
    tiles = 1 + {"gemv_ahead1": 1, "gemv_ahead2": 2}.get(kind, 0)
    # the fusions' own: the norm's whole row (4,096 bf16, in 8-byte loads or wider) and a tile's norm weights; the
    # gate's up half
    fused = {"gemv_prmt_norm": 4096 * 2 // (32 * warps) // 8 + 1, "gemv_prmt_gate": 1}.get(kind, 0)
    assert not any(SCALAR_BYTE_LOAD.fullmatch(op) for op in d["loads"]), d
    assert tiles <= wide <= tiles * (bn * bk * bits // 8 // (32 * warps) // 8) + 1 + fused, d
    assert d["stack"] == 0, d  # no spills


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gemm")])
def test_gemm_pipelines_the_weight_tile(compiled, name):
    d = compiled[name]
    assert d["cp.async"] + d["tma"] > 0, d  # the tiles reach shared memory asynchronously, stages ahead
    assert not any(SCALAR_BYTE_LOAD.fullmatch(op) for op in d["loads"]), d


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gemm_swap")])
def test_swapped_gemm_takes_the_weights_from_registers(compiled, name):
    """SWAP: the converted weight tile is the wgmma's left operand, read from registers (not written back to shared
    memory as the right operand must be), and x's tile comes whole (no strided int4 parting)."""
    d = compiled[name]
    assert d.get("wgmma A in registers", 0) > 0 and not d.get("wgmma A in shared"), d
    assert d["cp.async"] + d["tma"] > 0 and not any(SCALAR_BYTE_LOAD.fullmatch(op) for op in d["loads"]), d
    assert not any(".b16" in op for op in d["loads"]), d


# what any of our kernels may write under torch.compile: its outputs and split-K scratch, never an operand
OPERANDS = {"X", "W", "SCALE", "ZERO", "XS", "WS", "Q", "K", "V", "POS", "SLOPES", "KV_SCALE", "COS", "SIN", "NORM",
            "RES"}


def test_kernels_survive_torch_compiles_mutation_analysis():
    """Each launch shape the runtime uses (tests/perf/trace_probe.py) compiles with its scalar arguments bound as
    constexprs, as torch.compile's mutation analysis generates the TTIR (torch 2.11; on 2026-12-07 the split-K
    sums in the kernel did not: the analysis then took every input, weights included, as written), and this
    torch's analysis finds only outputs written."""
    rows = [json.loads(line) for line in _probe(["trace_probe.py"]) if line.startswith("{")]
    names = " / ".join(r["launch"] for r in rows)
    for shape in ("int8 torch.bfloat16 M=64 K=4096", "int4 torch.float16 M=1", "alibi=True", "cache=torch.int8",
                  "w8a8 torch.int8 M=64", "fused norm+eps", "fused gate+residual", "writing k, v"):  # the in-kernel
        # split-K sums, ALiBi, an int8 K/V cache, W8A8, the batch-1 fusions, the K/V write in attention
        assert shape in names, names
    for r in rows:
        assert r["error"] is None, r
        if r["written"] is not None:  # (a torch without the analysis: nothing to ask)
            # the writing decode attention ($EF_KV_IN_ATTENTION=1) writes the layer's cache, given once as K
            writes = {"K"} if "writing k, v" in r["launch"] and "_split_kernel" in r["launch"] else set()
            assert r["written"] and set(r["written"]) & OPERANDS == writes, r
