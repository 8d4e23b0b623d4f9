"""Weight-only GEMM in Triton: int8 or packed int4 weights dequantized in registers, for decode (batch
1..64) and prefill on CUDA; the kernel of runtime/quant/int8_wo.py and int4_wo.py there (the CPU path
and the oracle stay plain torch).

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K); each program walks every SPLIT_K-th BLOCK_K tile of K
(SPLIT_K > 1: fp32 partial sums, added in a fixed order after, so the result does not depend on timing: by the
caller's sum, or with REDUCE by each tile's last program, in the kernel). A tile never straddles
a group (BLOCK_K divides the group size; per channel the group is the whole row; the GEMV's tiles may hold NG
whole groups, each summed apart), so a tile's integer
levels (q - zero) go into one tl.dot in the activation dtype (exact: |q - zero| <= 127) and its fp32
partial sum is scaled once per output column: acc += (x_tile @ (q - zero)) * scale[group]. int4 bytes
hold input features 2j (low nibble) and 2j+1 (high): x is read as its even and odd columns, two dots.

`cuda_linear` is what a weight-only linear runs on CUDA ($EF_WO_KERNEL=auto): per batch the fastest of three
paths, from the H200 probe of a LLaMA-7B layer (tests/perf/gemv_probe.py, 2026-12-03, µs for its four
linears; cuBLAS bf16: 119.8 at batch 1, 122.6 at 64, 280.1 at 512):
- int4 with bf16 activations, batch 2-16 (and 1 where PRMT does not run: $EF_WO_PRMT=0, ROCm): torch's own
  int4 tinygemm (`aten._weight_int4pack_mm`, the kernel of torchao and gpt-fast), fed at load from our bytes:
  69.4 at batch 1 against 176 for the Triton GEMV here (H200, 2026-12-03); at batch 1 the Triton GEMV with
  PRMT now wins (H100, 2026-12-07: 64.0 against tinygemm's 69.6 in the same call; default_config);
- batch above DEQUANT_ABOVE (64): one Triton pass writes the float weight and cuBLAS multiplies (prefill; int4
  at 512: the Triton GEMM took 8,271, tinygemm slower still). The first version of that pass ran at 0.4 TB/s
  (int4 batch 64 at 47 ms a step, H200); this one reads each byte once, and its speed is not measured yet;
- otherwise the Triton kernels here (int8 at batch 1: 91.1; int4 at batch 64: 437 against tinygemm's 917).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _dot(x, w, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(x, w, input_precision="ieee")
    return tl.dot(x, w)


@triton.jit
def _levels(q, z, DTYPE: tl.constexpr, MAGIC: tl.constexpr):
    """int8 levels q - z (int32, z broadcastable to q) in DTYPE. MAGIC: fp32 2**23 + 128 + q by bits (an integer
    add) less 2**23 + 128 + z, exactly q - z, and bf16 as that float's upper half (exact: |q - z| < 256)."""
    if MAGIC:
        f = (q + 0x4B000080).to(tl.float32, bitcast=True) - (z.to(tl.float32) + 8388736.0)
        if DTYPE == tl.bfloat16:
            w = (f.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            w = f.to(DTYPE)
    else:
        w = (q - z).to(DTYPE)
    return w


@triton.jit
def _nibble_levels(q, z, DTYPE: tl.constexpr):
    """int4 levels q - z in DTYPE (q, z in [0, 15], int32, z broadcastable to q) without int-to-float conversions:
    each OR-ed into the mantissa of OFF (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400, both a ulp of 1 there) is
    OFF + q / OFF + z exactly, and their 16-bit difference is q - z exactly (|q - z| <= 15): a packed subtraction,
    two levels an instruction (HADD2). (Until the sixth session of 2026-12-07 the offset came out of the fp32 sums
    instead, x @ (OFF + q) - sum(x) (OFF + z): x's row sums a tile, ~60% more instructions in the 64-row loop.)"""
    return _nibble_off(q, DTYPE) - _nibble_off(z, DTYPE)


@triton.jit
def _nibble_off(q, DTYPE: tl.constexpr):
    """OFF + q in DTYPE for q in [0, 15] (int32), by bits: q OR-ed into the mantissa of OFF (bf16 128.0 = 0x4300,
    fp16 1024.0 = 0x6400, a ulp of 1 there)."""
    OFF: tl.constexpr = 0x4300 if DTYPE == tl.bfloat16 else 0x6400
    return (q | OFF).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _prmt_int8(raw):
    """int8 levels as fp32 by byte permutes (inline PTX: CUDA only; the interpreter takes the other forms' arithmetic),
    four a 32-bit register: one xor flips the four sign bits (q + 128, 0..255), one prmt a level puts the byte in
    bits 8-15 of 32768.0 (0x47000000, a ulp of 1 there): fp32 32768 + 128 + q, exact, summed as it is (the caller
    takes 32896 sum(x) off a tile's sum, as MAGIC's 384: no subtraction a weight; the offset costs the fp32 sums
    ~7 bits more than MAGIC's: ~1e-4 of the largest output in a numpy emulation of 4096 x 11008, below fp16's
    rounding of the outputs; launch keeps it from fp32 x). In sm90 SASS (Triton 3.6, the GPU machine's) the
    GEMV's loop is 15-20% shorter with it than with MAGIC (tests/perf/aot_inspect.py) where no tile is fetched
    ahead, and ~15% shorter again without the subtraction a weight (its first form, 2**23 + 128 + q, less 2**23 + 128
    a weight: 16 x 1024, 8 warps, 395 -> 330 instructions); with PREFETCH the carried byte tiles are repacked every
    step and the gain goes (16 x 512, one ahead: 0.312 -> 0.302 warp-instructions a byte in the first form)."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 pt, pk; mov.b32 pk, 0x47000000; xor.b32 pt, $4, 0x80808080; prmt.b32 $0, pt, pk, 0x7604; "
            "prmt.b32 $1, pt, pk, 0x7614; prmt.b32 $2, pt, pk, 0x7624; prmt.b32 $3, pt, pk, 0x7634; }",
        constraints="=r,=r,=r,=r,r", args=[raw], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _prmt_int4(raw):
    """int4 levels (raw uint8, two a byte) as fp32 by byte permutes, as _prmt_int8: two ands and a shift part the
    nibbles of four bytes (features 2j, 2j + 1), one prmt a level puts a nibble in bits 16-19 of 128.0
    (0x43000000, a ulp of 1 there): (lo, hi) fp32 128 + q, MAGIC's offset."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 pl, ph, pk; mov.b32 pk, 0x43000000; and.b32 pl, $8, 0x0F0F0F0F; shr.u32 ph, $8, 4; "
            "and.b32 ph, ph, 0x0F0F0F0F; prmt.b32 $0, pl, pk, 0x7044; prmt.b32 $1, pl, pk, 0x7144; "
            "prmt.b32 $2, pl, pk, 0x7244; prmt.b32 $3, pl, pk, 0x7344; prmt.b32 $4, ph, pk, 0x7044; "
            "prmt.b32 $5, ph, pk, 0x7144; prmt.b32 $6, ph, pk, 0x7244; prmt.b32 $7, ph, pk, 0x7344; }",
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[raw], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _byte_kmask(k0, j, K, HALF: tl.constexpr, EVEN_K: tl.constexpr):
    """Which of an int4 tile's HALF bytes (features k0 + 2j, k0 + 2j + 1) lie before K: on the byte index, which
    the compiler sees contiguous (8-byte loads; the feature index 2j allowed only byte loads), and no mask at all
    when every tile is whole (16-byte loads)."""
    if EVEN_K:
        m = tl.full([HALF], 1, tl.int1)
    else:
        m = (k0 // 2 + j) < K // 2
    return m


@triton.jit
def _gemv_tile(w_rows, nmask, k0, j, K, INT4: tl.constexpr, HALF: tl.constexpr, EVEN_K: tl.constexpr):
    """The GEMV's weight tile at feature k0, as stored (int4: HALF bytes of two levels each); zeros past K, so
    that a tile fetched ahead of the last step reads nothing."""
    if INT4:
        # (k0 past K, whole tiles: fetched ahead of the last step; a splat, uniform along j: wide loads stay)
        m = _byte_kmask(k0, j, K, HALF, EVEN_K) & ((tl.zeros([HALF], tl.int32) + k0) < K)
        return tl.load(w_rows + (k0 // 2 + j)[None, :], mask=nmask[:, None] & m[None, :], other=0)
    return tl.load(w_rows + (k0 + j)[None, :], mask=nmask[:, None] & (k0 + j < K)[None, :], other=0)


@triton.jit
def _out_value(acc, OUT, RES, rel, mask, RESID: tl.constexpr):
    """What OUT holds at rel for the fp32 sums acc: acc in OUT's dtype, and with RESID the residual RES (same
    offsets and dtype) added to that, rounded once more: h + linear(x) as two torch ops in OUT's dtype round it."""
    y = acc.to(OUT.dtype.element_ty)
    if RESID:
        y = (tl.load(RES + rel, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(OUT.dtype.element_ty)
    return y


@triton.jit
def _store_split(acc, OUT, PART, LOCKS, rel, mask, pid_k, tile, slice_elems,
                 SPLIT_K: tl.constexpr, REDUCE: tl.constexpr, RES, RESID: tl.constexpr):
    """Store a program's sum at offsets rel of an (M, N) output. SPLIT_K == 1: OUT itself. Else fp32 partials
    at slice pid_k of PART (SPLIT_K slices of slice_elems); REDUCE: the tile's last program to arrive (a counter
    a tile in LOCKS, zeros at launch) adds the SPLIT_K slices in their order, 0 first, and writes OUT: one
    kernel, and the bits do not depend on which program came last. Without REDUCE the caller sums PART.
    RESID: OUT gets the residual RES added (_out_value; split without REDUCE: by the caller)."""
    if SPLIT_K == 1:
        tl.store(OUT + rel, _out_value(acc, OUT, RES, rel, mask, RESID), mask=mask)
    else:
        tl.store(PART + pid_k.to(tl.int64) * slice_elems + rel, acc, mask=mask)
        if REDUCE:
            tl.debug_barrier()  # every thread's partial stored before the release below
            if tl.atomic_add(LOCKS + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = tl.zeros(acc.shape, tl.float32)
                # (k, not slice_elems, cast to 64 bits: torch.compile's mutation analysis binds scalar arguments
                # as constexprs, which have no .to; tests/perf/trace_probe.py)
                for k in range(SPLIT_K):  # (.cg: from L2, where the other programs' partials are)
                    total += tl.load(PART + tl.cast(k, tl.int64) * slice_elems + rel, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(OUT + rel, _out_value(total, OUT, RES, rel, mask, RESID), mask=mask)


@triton.jit
def _wo_kernel(X, W, SCALE, ZERO, OUT, PART, LOCKS, M, N, K, G, stride_xm, stride_wn, stride_om,
               GROUP: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               NATURAL: tl.constexpr, MAGIC: tl.constexpr, XSPLIT: tl.constexpr, JOIN: tl.constexpr,
               REDUCE: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr):
    """NATURAL: the weight tile is loaded as stored, (BLOCK_N, its K bytes), and transposed in registers; int4
    nibbles are interleaved back into feature order (tl.join), so x is read contiguously and one tl.dot takes
    the tile. Otherwise the tile is loaded as (K bytes, BLOCK_N) and int4 takes two dots, x's even and odd
    features. (The same products; which is faster is the sweep's question: tests/perf/bench_linear.py.)

    SWAP (with NATURAL): out^T = W x^T, the accumulator (BLOCK_N, BLOCK_M). On Hopper the converted weight tile is
    then the wgmma's left operand, which it reads from registers, where as the right operand it goes back to shared
    memory after conversion (a second pass through shared memory and a fence a tile; tests/perf/aot_inspect.py shows
    which). The weight rows fill the MMA's 64-row side, the batch its narrow side (as Marlin / Machete do): int8's
    default at 33-64 rows (default_config).

    MAGIC (int4, 16-bit x; either tile layout, SWAP too): a nibble becomes the 16-bit float OFF + q by bits
    alone, OR-ed into the mantissa of OFF (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400: both have a ulp of 1 there, so
    exact), and OFF + z leaves it by a packed 16-bit subtraction, exactly (_nibble_levels): no int-to-float
    conversion, which runs at a quarter of the FP32 rate (two a weight: s32 -> f32 -> 16-bit) and bounds the
    kernel, not the bytes; the levels are the plain path's, bit for bit.
    int8 (either tile layout): q + 128 goes into the low bits of fp32 2**23 (an integer add), one fp32 subtraction of
    2**23 + 128 + z leaves q - z exactly, and bf16 takes that float's upper 16 bits (exact: |q - z| < 256 has
    8 significant bits): an add, a subtract and a shift a weight instead of two conversions (int to float, at a
    quarter of the FP32 rate, then fp32 to bf16). The W8A8 GEMM, which converts nothing, read the same int8
    bytes at 2.2-2.4 TB/s at 64 rows where this kernel read 0.7-1.1 (H100, 2026-12-05): the suspect.

    XSPLIT (int4, not NATURAL): x's tile is loaded as one contiguous (BLOCK_M, BLOCK_K) block and parted into
    its even and odd features in registers (tl.split), instead of two stride-2 loads: those are one scalar
    load an element, at batch 64 as many load instructions as weight elements (the int8 tile's x takes 1/8),
    the suspect of int4's 0.18 TB/s at 64 rows against int8's 0.7-1.1 (H100, 2026-12-06).

    JOIN (int4, not NATURAL): x's tile read contiguously as well, and the weight's (HALF, BLOCK_N) levels
    interleaved back into (BLOCK_K, BLOCK_N) feature order in registers (tl.join + permute): one dot over x as
    stored, no even / odd parting of x; the weight tile goes to shared memory for the dot either way.
    XSPLIT and JOIN untimed yet: off by default, first in the sweep's grid."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    HALF: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
    j = tl.arange(0, HALF)
    x_rows = X + m.to(tl.int64)[:, None] * stride_xm
    w_cols = W + n.to(tl.int64)[None, :] * stride_wn
    w_rows = W + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        g = k0 // GROUP  # one group per tile
        if HAS_ZERO:
            z = tl.load(ZERO + n * G + g, mask=nmask, other=0).to(tl.int32)
        else:
            z = tl.zeros([BLOCK_N], tl.int32)
        s = tl.load(SCALE + n * G + g, mask=nmask, other=0.0).to(tl.float32)
        if NATURAL:
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            jj = k0 // 2 + j if INT4 else k0 + j
            b = tl.load(w_rows + jj[None, :], mask=nmask[:, None] & (jj < (K // 2 if INT4 else K))[None, :],
                        other=0).to(tl.int32)  # (BLOCK_N, HALF)
            if INT4:
                b = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))  # features 2j, 2j + 1 in order
            if INT4 and MAGIC:  # by bits and a packed subtraction
                wn = _nibble_levels(b, z[:, None], X.dtype.element_ty)  # (BLOCK_N, BLOCK_K)
            else:
                wn = _levels(b, z[:, None], X.dtype.element_ty, MAGIC)  # (BLOCK_N, BLOCK_K)
            if SWAP:  # out^T = w x^T: the levels are the MMA's left operand, taken from registers
                part = _dot(wn, tl.trans(x), IEEE)  # (BLOCK_N, BLOCK_M)
            else:
                part = _dot(x, tl.trans(wn), IEEE)
        elif INT4:
            kk = k0 + 2 * j  # the even input features of the tile
            kmask = kk < K
            bmask = _byte_kmask(k0, j, K, HALF, EVEN_K)  # = kmask, in a form that allows vector loads
            b = tl.load(w_cols + (k0 // 2 + j)[:, None], mask=bmask[:, None] & nmask[None, :], other=0).to(tl.int32)
            if MAGIC:  # by bits and a packed subtraction
                lo = _nibble_levels(b & 15, z[None, :], X.dtype.element_ty)  # (HALF, BLOCK_N) features 2j
                hi = _nibble_levels(b >> 4, z[None, :], X.dtype.element_ty)  # ... 2j + 1
            else:
                lo = ((b & 15) - z[None, :]).to(X.dtype.element_ty)  # (HALF, BLOCK_N) levels of features 2j
                hi = ((b >> 4) - z[None, :]).to(X.dtype.element_ty)  # ... of features 2j + 1
            if JOIN or XSPLIT:  # x's tile read contiguously (vector loads)
                kx = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_rows + kx[None, :], mask=mmask[:, None] & (kx < K)[None, :], other=0.0)
            if JOIN:  # the levels interleaved back into feature order: one dot over x as stored
                w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))
                part = _dot(xt, w, IEEE)
            else:
                if XSPLIT:  # x's even / odd features parted in registers
                    x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, HALF, 2)))
                else:  # two strided reads: one scalar load an element
                    x_even = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                    x_odd = tl.load(x_rows + (kk + 1)[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                part = _dot(x_even, lo, IEEE) + _dot(x_odd, hi, IEEE)
        else:
            kk = k0 + j
            kmask = kk < K
            q = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0).to(tl.int32)
            w = _levels(q, z[None, :], X.dtype.element_ty, MAGIC)
            x = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            part = _dot(x, w, IEEE)
        if SWAP:
            acc += part * s[:, None]
        else:
            acc += part * s[None, :]
    if SWAP:  # stored through transposed offsets, not transposed in registers
        rel, omask = m.to(tl.int64)[None, :] * stride_om + n[:, None], nmask[:, None] & mmask[None, :]
    else:
        rel, omask = m.to(tl.int64)[:, None] * stride_om + n[None, :], mmask[:, None] & nmask[None, :]
    _store_split(acc, OUT, PART, LOCKS, rel, omask, pid_k, pid_m * tl.num_programs(1) + pid_n,
                 M * stride_om, SPLIT_K, REDUCE, OUT, False)


@triton.jit
def _gemv_rstd(X, K, eps, PRO: tl.constexpr, KP: tl.constexpr):
    """PRO 1: 1 / sqrt(mean(h^2) + eps) of the whole row h = X[:K] (KP: K's next power of two; every program reads
    the row, from L2: it was just written), in fp32 as runtime/model.py's _Norm; else 1."""
    if PRO == 1:
        kp = tl.arange(0, KP)
        h = tl.load(X + kp, mask=kp < K, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(h * h, axis=0) / K + eps)  # (as Inductor compiles _Norm's torch.rsqrt)
    else:
        r = 1.0
    return r


@triton.jit
def _gemv_x(X, NORM, kk, kmask, K, rstd, PRO: tl.constexpr):
    """The GEMV's input at features kk (fp32), made from X by its prologue PRO (runtime/model.py's ops): 0, X as it
    is; 1, RMSNorm: NORM * (X * rstd rounded to X's dtype), rounded, as eager _Norm rounds; 2, a gated MLP's
    silu(gate) * up from X = [gate | up] (2K features), in fp32 and rounded once, as Inductor fuses it. (A compiled
    unfused step keeps the norm's intermediate in fp32 and rounds the gate once; eager rounds the gate twice: in 16-bit
    dtypes the fused step is within a rounding of either, not bit-equal.)"""
    if PRO == 1:
        h = tl.load(X + kk, mask=kmask, other=0.0)
        y = (h.to(tl.float32) * rstd).to(h.dtype)
        w = tl.load(NORM + kk, mask=kmask, other=0.0)
        x = (w.to(tl.float32) * y.to(tl.float32)).to(h.dtype)
    elif PRO == 2:
        g = tl.load(X + kk, mask=kmask, other=0.0)
        gf = g.to(tl.float32)
        u = tl.load(X + K + kk, mask=kmask, other=0.0).to(tl.float32)
        x = (gf / (1.0 + tl.exp(-gf)) * u).to(g.dtype)
    else:
        x = tl.load(X + kk, mask=kmask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _wo_gemv_kernel(X, W, SCALE, ZERO, OUT, PART, LOCKS, NORM, RES, N, K, G, stride_wn, eps,
                    GROUP: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, MAGIC: tl.constexpr,
                    NG: tl.constexpr, REDUCE: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
                    PRMT: tl.constexpr, PRO: tl.constexpr, KP: tl.constexpr, RESID: tl.constexpr):
    """One input row (decode at batch 1): no tensor cores, each weight row read along K (contiguous bytes),
    multiplied by x in fp32 and summed; a tile's sum is scaled once: s * (sum(q x) - z sum(x)).

    NG > 1: a tile spans NG whole groups (BLOCK_K = NG * GROUP), each summed apart and scaled by its own scale
    and zero: long contiguous reads of each weight row (int4 g128 otherwise reads 64 bytes a row a step, where
    int8 per channel reads 512).

    MAGIC: an int4 nibble becomes the fp32 128 + q by bits alone, its 4 bits put at the units place of 128.0's
    mantissa (0x43000000, bits 16-19): a shift and one and-or, where an int-to-float conversion runs at a
    fraction of the FP32 rate; and the 128 goes into the zero point: s * (sum((128 + q) x) - (128 + z) sum(x)).
    The sums lose ~4 bits of fp32 to the offset (values to 143 where q is at most 15), far below bf16's.
    int8 the same way: 384 + q, from 256.0 (0x43800000) with q + 128 in the mantissa's bits 15-22 (one and-xor).

    PREFETCH = D (0, 1, 2): the weight tiles D steps ahead are loaded before a step's arithmetic (registers, as
    stored), so that D + 1 tiles are in flight where the loads of one tile at a time leave a program's share of
    the memory system idle between steps (a GEMV is bound by the bytes each SM keeps in flight: one 16 KiB
    tile a program and one or two programs an SM at a 4096-wide linear).

    PRMT (CUDA only): the levels made by byte permutes instead of MAGIC's shifts and masks (_prmt_int8, _prmt_int4).

    The pointwise work around a decode linear, in the kernel ($EF_WO_FUSE=1, fused_linear): PRO, a prologue that
    makes x from X (_gemv_x: the RMSNorm before attn.qkv and mlp.up, norm weight NORM, each program finding the
    row's rstd itself; the gated activation before mlp.down); RESID, the residual RES added to the output (after
    attn.o and mlp.down)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    HALF: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K
    j = tl.arange(0, HALF)
    w_rows = W + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N], tl.float32)
    k_first = pid_k * BLOCK_K
    STEP: tl.constexpr = BLOCK_K * SPLIT_K
    rstd = _gemv_rstd(X, K, eps, PRO, KP)
    if PREFETCH >= 1:
        ahead1 = _gemv_tile(w_rows, nmask, k_first, j, K, INT4, HALF, EVEN_K)
    if PREFETCH >= 2:
        ahead2 = _gemv_tile(w_rows, nmask, k_first + STEP, j, K, INT4, HALF, EVEN_K)
    for k0 in range(k_first, K, STEP):
        if PREFETCH == 1:
            raw = ahead1
            ahead1 = _gemv_tile(w_rows, nmask, k0 + STEP, j, K, INT4, HALF, EVEN_K)
        elif PREFETCH == 2:
            raw = ahead1
            ahead1 = ahead2
            ahead2 = _gemv_tile(w_rows, nmask, k0 + 2 * STEP, j, K, INT4, HALF, EVEN_K)
        g = k0 // GROUP
        if NG > 1:  # the scales and zeros of the tile's groups: (BLOCK_N, NG)
            gg = g + tl.arange(0, NG)
            meta, mmask = n[:, None] * G + gg[None, :], nmask[:, None] & (gg < G)[None, :]
        else:
            meta, mmask = n * G + g, nmask
        s = tl.load(SCALE + meta, mask=mmask, other=0.0).to(tl.float32)
        if PREFETCH == 0:  # (here, after the scales' load: int4's ptxas then needs ~110 registers, not ~170)
            raw = _gemv_tile(w_rows, nmask, k0, j, K, INT4, HALF, EVEN_K)
        if INT4:
            kk = k0 + tl.arange(0, BLOCK_K)
            x = _gemv_x(X, NORM, kk, kk < K, K, rstd, PRO)
            b = raw.to(tl.int32)
            if PRMT:
                lo, hi = _prmt_int4(raw)  # 128 + (b & 15), 128 + (b >> 4)
            elif MAGIC:
                lo = (((b << 16) & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)  # 128 + (b & 15)
                hi = (((b << 12) & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)  # 128 + (b >> 4)
            else:
                lo, hi = (b & 15).to(tl.float32), (b >> 4).to(tl.float32)
            # the levels in feature order (2j, 2j + 1 side by side in a thread) against x as stored: one product
            # sum, an FMA a level (lo * x_even + hi * x_odd summed after took an FMUL, an FMA and an FADD a pair)
            q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        else:
            kk = k0 + j
            kmask = kk < K
            if PRMT:  # 32896 + q, exact (the offset leaves with the zero point below)
                q = _prmt_int8(raw)
            elif MAGIC:  # 384 + q: q + 128 (0..255) at the units place of 256.0's mantissa (bits 15-22)
                q = (((raw.to(tl.int32) << 15) & 0x7F8000) ^ 0x43C00000).to(tl.float32, bitcast=True)
            else:
                q = raw.to(tl.int32).to(tl.float32)
            x = _gemv_x(X, NORM, kk, kmask, K, rstd, PRO)
        if NG > 1:  # per group: (BLOCK_N, NG) sums, (NG,) sums of x
            dot = tl.sum(tl.reshape(q * x[None, :], (BLOCK_N, NG, BLOCK_K // NG)), axis=2)
            xsum = tl.sum(tl.reshape(x, (NG, BLOCK_K // NG)), axis=1)
        else:
            dot = tl.sum(q * x[None, :], axis=1)
            xsum = tl.sum(x, axis=0)
        if HAS_ZERO:
            z = tl.load(ZERO + meta, mask=mmask, other=0).to(tl.float32)
        else:
            z = tl.zeros(s.shape, tl.float32)
        if INT4 and (MAGIC or PRMT):
            z += 128.0
        elif PRMT:
            z += 32896.0
        elif MAGIC:
            z += 384.0
        if NG > 1:
            acc += tl.sum((dot - z * xsum[None, :]) * s, axis=1)
        else:
            acc += (dot - z * xsum) * s
    _store_split(acc, OUT, PART, LOCKS, n.to(tl.int64), nmask, pid_k, pid_n, N, SPLIT_K, REDUCE, RES, RESID)


def _sm_count(device: torch.device) -> int:
    from ..attention_triton import _sm_count as sms

    return sms(device)


def default_config(M: int, N: int, K: int, group: int, sms: int, bits: int = 8, prmt: bool = True) -> dict:
    """Launch shape from static sizes (the same launch every decode step); BLOCK_K divides the group. prmt: the
    GEMV may make its levels by byte permutes (CUDA, not ROCm; $EF_WO_PRMT=0 says no).

    Batch 1 takes the GEMV kernel. int8 per channel, with PRMT: 16 x 1024 tiles, 8 warps, no tile loaded ahead,
    K split only where the tiles are under half the SMs (H100, 2026-12-07, seventh session, bench_linear --sweep,
    257 shapes, CUDA-graph timed, us: attn.qkv 21.16, attn.o 10.68, mlp.up 35.78, mlp.down 22.95: 90.6 a
    LLaMA-7B layer, the best single shape, against 99.4 for the shape below; per-linear bests summed 89.9; timed in
    PRMT's first form; the second, without a subtraction a weight (_prmt_int8), 88.6 in the eighth session's
    sweep, still the best of 45 shapes, and the int8 engine 1.65x bf16 at batch 1 with it). Without
    PRMT: where the 32-row tiles are fewer than two a multiprocessor
    (attn.o and mlp.down of LLaMA-7B, 4,096 outputs), 16-row tiles with the next weight tile loaded ahead
    (PREFETCH 1): on the H100 (2026-12-07, bench_linear --sweep, CUDA-graph timed) attn.o 13.72 -> 11.83 us and
    mlp.down 31.28 -> 26.01 (a layer 105.1 -> 97.9; wider linears keep the 32 rows: attn.qkv 21.98 against 25.99
    ahead, mlp.up 38.11); two steps ahead lost (13.58 at attn.o; why is not known: 76 registers, room for three
    programs an SM). The K split counts these 16-row tiles (a narrow linear, e.g. a tp shard, splits half as
    often as with 32-row tiles; untimed). Else 32 x 512 tiles, 8 warps, K split only where the 32-row tiles are
    under half the SMs: the split's fp32 partials cost the engine a summing kernel a linear, which the H200
    profile of 2026-12-06 put at 0.38 ms of a 3.22 ms step (12%) with K split 8 ways, while the H200
    sweep of 2026-12-03 (tests/perf/bench_linear.py --sweep, which times a linear with its sum) had 32 x 512, 8
    warps, no split within 0-5% of each linear's best (attn.qkv 21.07 us, the best; attn.o 12.71 vs 12.59;
    mlp.up 34.38 vs 32.78). Predicted: ~0.3 ms a step less at batch 1 (int8_wo 291 -> ~320 total tok/s on the
    H200); not measured yet. int4 at batch 1 (where a tile of 512 features holds whole groups or lies in one):
    32 x 512 tiles, 4 warps, K split 4 ways added in the kernel (REDUCE): 86.8 us a LLaMA-7B layer against 111.0
    for the 128 x 128, split-8 shape before it, the best single shape of the H100 sweep of 2026-12-07 (after the
    int4 loads became 16 bytes wide; per-linear bests summed 84.9; torch's tinygemm: 69.5). With PRMT (levels
    joined in feature order) the same tiles, K split only until there are four programs an SM (H100, 2026-12-07,
    eighth session, bench_linear --sweep, 44 shapes, us: attn.qkv 16.02 split 2, attn.o 8.67 split 4, mlp.up
    22.73 unsplit, mlp.down 16.61 split 4: 64.0 a layer against 82.4 for the split-4 shape with MAGIC and 69.6
    for tinygemm in the same call; the engine now leaves tinygemm to batches 2-16). Swept in bf16 with groups of
    128; fp16 (the int4 presets' float part) and per-channel weights take the same shape, untimed (a per-channel
    row is one group, so a 512-wide tile lies in it whatever K is: LLaMA-7B's mlp.down, K 11,008, too). int8 per
    channel at 33-64 rows: SWAP 64 x 64 x 128 tiles (the weight rows on the MMA's 64-row side), 3 stages, K split
    2 ways added in the kernel (REDUCE) where the 64-row tiles are fewer than two an SM, none where more (H100,
    2026-12-07, bench_linear --sweep at 64 rows, 111 shapes, us: attn.qkv 35.69 split 2 against 39.0 unsplit,
    attn.o 19.39 and mlp.down 41.82 split 2, mlp.up 54.1 unsplit against 68.26 split 2; the shape before it,
    64 x 64 x 128 split 2-16 by linear and summed after, 208.5 a layer), and more splits
    while the programs would fill under half the SMs (a tp shard's narrow linear; untimed): 151.0 a layer by those
    rows, not yet timed in the engine. Split 2 everywhere (165.2 a layer) took the int8 engine at batch 64 from
    6,068 to 6,515 total tok/s (the same H100, next call), while that call's torch (2.11) still took this kernel's
    every input as written (tests/perf/trace_probe.py; fixed after); timed on Hopper only, where SWAP's reason
    holds. Small M: narrow N tiles, K split until there are about WAVES programs per multiprocessor (a 4096-wide
    attn.o has only 128 tiles of 32 outputs for 132 SMs). int4 (groups of 128 or more) at 33-64 rows: the int8
    shape above, SWAP 64 x 64 x 128, 3 stages, the same K splits, MAGIC in its second form (_nibble_levels: the
    zero point subtracted in 16 bits; sm90 SASS, Triton 3.6, with zero points: a 386-instruction loop against 416
    without MAGIC, whose 64 int-to-float conversions run at a quarter rate): H100, 2026-12-07, seventh session,
    bench_linear --sweep at 64 rows, 125 shapes, us: attn.qkv 33.14 with MAGIC against 38.45 without, attn.o
    21.5, mlp.up 51.0 unsplit against 62.01 without, mlp.down 48.89: 154.5 a layer against 172.2 for MAGIC only
    where the programs were no more than the SMs (the sixth session's choice, when MAGIC's first form took the
    offset out of the fp32 sums and lost where there were more programs: 166.4 by its sweep) and 330.4 for the
    shape before that. In the engine with the sixth session's choice (same H100, seventh session): int4 g128
    at batch 64 6,527.7 total tok/s against bf16's 6,691.2 (0.98x). Swept for g128 only (per channel and groups of
    256 or more take the same shape, untimed)."""
    block_k = next(b for b in (128, 64, 32) if group % b == 0) if group % 32 == 0 else 32
    if M == 1 and bits == 8 and group == K:  # per channel: the K splits only where the rows are too few
        rows, wide, ahead = (16, 1024, 0) if prmt else (16, 512, 1) if triton.cdiv(N, 32) < 2 * sms else (32, 512, 0)
        split = 1
        while triton.cdiv(N, rows) * split < sms // 2 and K // (wide * split * 2) >= 2:
            split *= 2
        return {"GEMV": True, "BLOCK_N": rows, "BLOCK_K": wide, "SPLIT_K": split, "num_warps": 8, "MAGIC": True,
                "PREFETCH": ahead, "PRMT": prmt}
    if M == 1 and bits == 4 and (group % 512 == 0 or 512 % group == 0 or group == K):  # whole groups (NG) or in one
        split = 1 if prmt else 4
        while prmt and split < 4 and triton.cdiv(N, 32) * split < 4 * sms and K // (512 * split * 2) >= 2:
            split *= 2  # with PRMT (the docstring): until there are four programs an SM
        while split > 1 and K // (512 * split) < 2:
            split //= 2
        return {"GEMV": True, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": split, "num_warps": 4, "MAGIC": True,
                "REDUCE": split > 1, "PREFETCH": 0, "PRMT": prmt}
    if M == 1:
        wide = 256 if bits == 8 and group % 256 == 0 else block_k
        split = 8
        while split > 1 and K // (wide * split) < 2:  # at least two K tiles a program
            split //= 2
        return {"GEMV": True, "BLOCK_N": 32 if bits == 8 else 128, "BLOCK_K": wide, "SPLIT_K": split, "num_warps": 4,
                "MAGIC": True}
    if 32 < M <= 64 and ((bits == 8 and group == K) or (bits == 4 and group % 128 == 0)):  # (the docstring)
        tiles = triton.cdiv(N, 64)
        split = 1 if tiles >= 2 * sms else 2
        while tiles * split < sms // 2 and K // (128 * split * 2) >= 4:  # >= 4 tiles of K per program
            split *= 2
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split, "REDUCE": split > 1, "SWAP": True,
                "MAGIC": True, "num_warps": 4, "num_stages": 3}
    if M <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": block_k, "num_warps": 4}
        tiles = triton.cdiv(N, 32)
    elif M <= 64:  # (ranges, not next_power_of_2(M): a compiled prefill with dynamic M guards on these only)
        cfg = {"BLOCK_M": 32 if M <= 32 else 64, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4}
        tiles = triton.cdiv(N, 64)
    else:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": min(block_k, 64), "num_warps": 8, "SPLIT_K": 1}
    split = 1
    while tiles * split < WAVES * sms and K // (cfg["BLOCK_K"] * split * 2) >= 4:  # >= 4 tiles of K per program
        split *= 2
    return {**cfg, "SPLIT_K": split}


WAVES = 4


def _prmt_runs(x: torch.Tensor) -> bool:
    """Whether the GEMV's PRMT levels can serve x: inline PTX runs on NVIDIA GPUs only (not ROCm, not Triton's
    interpreter, which the CPU tests run), and for 16-bit x only (int8's 32896 offset leaves ~1e-4 relative
    error, below fp16's rounding of the outputs but not fp32's 1e-6)."""
    return x.is_cuda and torch.version.hip is None and x.dtype != torch.float32


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
           prmt: bool = True, norm: torch.Tensor | None = None, eps: float = 0.0, gate: bool = False,
           residual: torch.Tensor | None = None, **cfg) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype; weight (N, K) int8 (bits 8) or (N, K/2) uint8 (bits 4); scale and
    zero (N, groups) or (N,); zero None: symmetric. prmt False: never the GEMV's PRMT (which only CUDA has).
    The batch-1 GEMV's fusions (_wo_gemv_kernel, M 1): norm (K,), an RMSNorm of x (eps) first; gate, x is (1, 2K),
    [gate | up], and the input silu(gate) * up; residual (1, N), added to the output."""
    M = x.shape[0]
    N = weight.shape[0]
    K = weight.shape[1] * (2 if bits == 4 else 1)
    G = scale.numel() // N
    group = K // G
    pro = 1 if norm is not None else 2 if gate else 0
    assert x.shape[1] == K * (2 if gate else 1) and K % G == 0 and weight.stride(1) == 1 and x.stride(1) == 1
    assert not (norm is not None and gate) and (M == 1 or not (pro or residual is not None)), "fusions: GEMV only"
    assert norm is None or (norm.shape == (K,) and norm.is_contiguous()), "norm: (K,) weights"
    assert residual is None or (residual.shape == (1, N) and residual.dtype == x.dtype and residual.is_contiguous())
    prmt = prmt and _prmt_runs(x)
    cfg = dict(cfg or default_config(M, N, K, group, _sm_count(x.device) if x.is_cuda else 132, bits, prmt))
    cfg.setdefault("SPLIT_K", 1)
    gemv = cfg.pop("GEMV", False)
    # every constexpr passed: wrap_triton (torch.compile) does not fill in a kernel's defaults
    cfg.setdefault("MAGIC", False)
    if gemv:
        cfg.setdefault("PREFETCH", 0)
        assert cfg["PREFETCH"] in (0, 1, 2), cfg  # weight tiles loaded ahead: none, one or two
        cfg["PRMT"] = cfg.get("PRMT", False) and prmt
    else:
        cfg.pop("PREFETCH", None)  # (the GEMM pipelines its tiles through shared memory: num_stages)
        cfg.pop("PRMT", None)  # (the GEMV's)
        cfg["SWAP"] = cfg.get("SWAP", False)
        cfg["NATURAL"] = cfg.get("NATURAL", False) or cfg["SWAP"]  # SWAP loads the tile as stored
        cfg["XSPLIT"] = cfg.get("XSPLIT", False) and bits == 4 and not cfg["NATURAL"]
        cfg["JOIN"] = cfg.get("JOIN", False) and bits == 4 and not cfg["NATURAL"]
        # the GEMM's MAGIC: int8, or int4 with 16-bit x (either tile layout; _wo_kernel's docstring)
        cfg["MAGIC"] = cfg["MAGIC"] and (bits == 8 or x.dtype in (torch.bfloat16, torch.float16))
    # a tile never straddles two groups; the GEMV's may hold several whole ones (NG)
    ng = cfg["BLOCK_K"] // group if gemv and G > 1 and cfg["BLOCK_K"] > group else 1
    assert group % cfg["BLOCK_K"] == 0 or G == 1 or (ng * group == cfg["BLOCK_K"] and not ng & (ng - 1)), (group, cfg)
    split = cfg["SPLIT_K"]
    cfg["EVEN_K"] = K % cfg["BLOCK_K"] == 0  # every tile whole: no mask along K (int4: wider weight loads)
    cfg["REDUCE"] = reduce = cfg.get("REDUCE", False) and split > 1
    # split K: fp32 partials (SPLIT_K, M, N), summed in order by the kernel (REDUCE) or below
    out = torch.empty((M, N), dtype=x.dtype, device=x.device) if split == 1 or reduce else None
    # (split 1: an unread stand-in, as ZERO and LOCKS below and OUT: no tensor the kernel writes is passed twice,
    # which torch.compile's functionalization of the kernel's writes could take for two)
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else scale
    z = zero if zero is not None else scale
    if gemv:
        assert M == 1, M
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
    else:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    # a counter a tile, zeros, with REDUCE only (the kernel never reads LOCKS otherwise: no fill kernel a linear)
    locks = torch.zeros(grid[0] * (1 if gemv else grid[1]), dtype=torch.int32, device=x.device) if reduce else scale
    dest = out if out is not None else scale  # (split, no REDUCE: the kernel writes PART only)
    if gemv:
        # (the fusions' unread stand-ins: scale, as for ZERO above; RESID with a split summed below: added there)
        resid = residual is not None and (split == 1 or reduce)
        wrap_triton(_wo_gemv_kernel)[grid](
            x, weight, scale, z, dest, part, locks, norm if norm is not None else scale,
            residual if resid else scale, N, K, G, weight.stride(0), float(eps), GROUP=group, INT4=bits == 4,
            HAS_ZERO=zero is not None, NG=ng, PRO=pro, KP=triton.next_power_of_2(K) if pro == 1 else 1, RESID=resid,
            **cfg)
    else:
        assert not pro and residual is None, "fusions: GEMV only"
        wrap_triton(_wo_kernel)[grid](
            x, weight, scale, z, dest, part, locks, M, N, K, G, x.stride(0), weight.stride(0), N,
            GROUP=group, INT4=bits == 4, HAS_ZERO=zero is not None, IEEE=x.dtype == torch.float32, **cfg)
    if out is not None:
        return out
    y = part.sum(0).to(x.dtype)
    return y if residual is None else residual + y


@triton.jit
def _dequant_kernel(W, SCALE, ZERO, OUT, N, K, G, stride_wn, GROUP: tl.constexpr, INT4: tl.constexpr,
                    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (N, K) float weight: (q - zero) in the output dtype (an exact integer) times the scale, rounded
    once: the arithmetic of the plain-torch dequantize (int4_wo.dequantize), so the same bits. A tile of
    BLOCK_K features lies in one group (BLOCK_K divides GROUP): one scale and zero per row, and int4 bytes are
    read once, their two levels interleaved back into feature order (tl.join)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    nmask = n < N
    meta = n.to(tl.int64) * G + k0 // GROUP
    s = tl.load(SCALE + meta, mask=nmask, other=0.0)
    rows = W + n.to(tl.int64)[:, None] * stride_wn
    if INT4:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(rows + j[None, :], mask=nmask[:, None] & (j < K // 2)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))  # features 2j, 2j + 1
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(rows + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0).to(tl.int32)
    if HAS_ZERO:
        q = q - tl.load(ZERO + meta, mask=nmask, other=0).to(tl.int32)[:, None]
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + n.to(tl.int64)[:, None] * K + k[None, :], q.to(s.dtype) * s[:, None],
             mask=nmask[:, None] & (k < K)[None, :])


@triton_op("engine_factory::weight_only_dequantize", mutates_args=())
def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """weight (N, K) int8 or (N, K/2) packed uint8 -> (N, K) in the scale's dtype, one pass."""
    N = weight.shape[0]
    K = weight.shape[1] * (2 if bits == 4 else 1)
    G = scale.numel() // N
    out = torch.empty((N, K), dtype=scale.dtype, device=weight.device)
    group = K // G
    block_k = next(b for b in (128, 64, 32, 16, 8, 4, 2, 1) if group % b == 0)  # a tile within one group
    grid = (triton.cdiv(N, 32), triton.cdiv(K, block_k))
    wrap_triton(_dequant_kernel)[grid](weight, scale, zero if zero is not None else scale, out, N, K, G,
                                       weight.stride(0), GROUP=group, INT4=bits == 4, HAS_ZERO=zero is not None,
                                       BLOCK_N=32, BLOCK_K=block_k)
    return out


def tinygemm_operands(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple | None:
    """Our int4 (weight (N, K/2) uint8 with feature 2j in the low nibble; scale, zero (N, groups) or (N,)) as
    torch's tinygemm takes it, or None where it cannot (not bf16, or sizes it does not tile). tinygemm
    computes (q - 8) * scale + offset: offset = (8 - zero) * scale, rounded to bf16 (the one difference from
    our arithmetic, ~6e-4 relative on a 7B layer's outputs). Per channel becomes groups of the same scale."""
    if weight.device.type != "cuda" or scale.dtype != torch.bfloat16 \
            or torch.cuda.get_device_capability(weight.device) < (8, 0):  # tinygemm needs sm >= 80 (and bf16)
        return None
    N, K = weight.shape[0], weight.shape[1] * 2
    s, z = scale.reshape(N, -1), zero.reshape(N, -1)
    group = K // s.shape[1]
    if s.shape[1] == 1:  # per channel: the same scale for each group of 128 (or less) features
        group = next((g for g in (128, 64, 32) if K % g == 0), None)
        if group is None:
            return None
        s, z = s.expand(N, K // group), z.expand(N, K // group)
    inner = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if group not in (32, 64, 128, 256) or inner is None or N % 8:
        return None
    swapped = ((weight << 4) | (weight >> 4)).contiguous()  # tinygemm's byte holds feature 2j in the high nibble
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped, inner)
    offset = ((8.0 - z.float()) * s.float()).to(torch.bfloat16)
    return packed, torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous(), group  # (groups, N, 2)


TINYGEMM_UP_TO = 16
DEQUANT_ABOVE = 64
# $EF_WO_PRMT=0: never the GEMV's levels by byte permutes (_prmt_int8 / _prmt_int4; default_config takes them for
# int8 and int4 at batch 1; int4 in bf16 then takes tinygemm at batch 1 too), for A/B runs; read once, at import,
# and passed to the op as an argument, so that a compiled graph and its cache key hold it
PRMT = os.environ.get("EF_WO_PRMT", "1") != "0"


def cuda_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                tiny: tuple | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) by the fastest path for its batch (module docstring); tiny: tinygemm_operands."""
    M = x.numel() // x.shape[-1]
    # at batch 1 the Triton GEMV with PRMT beats tinygemm (default_config), where PRMT runs
    if tiny is not None and (1 < M or not (PRMT and _prmt_runs(x))) and M <= TINYGEMM_UP_TO \
            and x.dtype == torch.bfloat16:
        packed, scale_offset, group = tiny
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(M, x.shape[-1]).contiguous(), packed, group, scale_offset)
        return y.reshape(*lead, y.shape[-1])
    if M > DEQUANT_ABOVE:
        return torch.nn.functional.linear(x, dequantize(weight, scale, zero, bits).to(x.dtype))
    return weight_only_linear(x, weight, scale, zero, bits, PRMT)


# $EF_WO_FUSE=1: decode at batch 1 runs the RMSNorm before attn.qkv and mlp.up, the gated activation before
# mlp.down and the residual adds after attn.o and mlp.down inside the GEMV (fused_linear): a layer of a LLaMA
# engine is 7 kernels instead of 10. Off by default until timed in an engine. Read once, at import: it decides
# which ops runtime/model.py traces (a linear reads it when made: GemvFusions.init_fusions)
FUSE = os.environ.get("EF_WO_FUSE", "0") == "1"


def fused_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 tiny: tuple | None = None, norm: torch.Tensor | None = None, eps: float = 0.0, gate: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """cuda_linear with the pointwise work around it in the kernel (launch's norm, gate, residual), where the batch-1
    GEMV is what cuda_linear runs for x (one row); else None, and the caller runs the plain ops. (Asked only where
    $EF_WO_FUSE=1 when the linear was made: runtime/quant/__init__.py's GemvFusions.)"""
    K = x.shape[-1] // (2 if gate else 1)
    gemv = x.numel() == x.shape[-1] and not (tiny is not None and x.dtype == torch.bfloat16
                                               and not (PRMT and _prmt_runs(x)))
    if not gemv or (norm is not None and norm.shape != (K,)):
        return None
    return weight_only_linear(x, weight, scale, zero, bits, PRMT, norm, eps, gate, residual)


@triton_op("engine_factory::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bits: int, prmt: bool = True, norm: torch.Tensor | None = None, eps: float = 0.0,
                       gate: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N): the weight-only GEMM as a triton_op, so torch.compile(fullgraph=True) traces
    into the kernel and CUDA graphs capture it (norm, gate, residual: launch's fusions, one row)."""
    lead = x.shape[:-1]
    res = residual.reshape(1, -1).contiguous() if residual is not None else None
    y = launch(x.reshape(-1, x.shape[-1]).contiguous(), weight, scale, zero, bits, prmt, norm, eps, gate, res)
    return y.reshape(*lead, y.shape[-1])
