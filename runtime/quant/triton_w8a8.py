"""W8A8 GEMM for decode batches: int8 x int8 (SmoothQuant, runtime/quant/sq.py) and E4M3 x E4M3 (fp8.py)
in Triton, with the scale epilogue, for M <= SMALL_M rows.

Why: at decode batch sizes the library GEMMs are slower than bf16 cuBLAS on the H200 (the four linears of a
LLaMA-7B layer, tests/perf/bench_linear.py 2026-12-03: torch._int_mm 177.6 / 200.5 µs at batch 1 / 64,
torch._scaled_mm 104.8 / 115.1, cuBLAS bf16 119.5 / 124.3), though they read half of bf16's weight bytes:
the GEMMs are tuned for big M, and _int_mm needs M > 16 (padded). Here a (BLOCK_M <= 64) x BLOCK_N tile
reads its weight rows once along K (contiguous bytes), tl.dot accumulates in int32 (int8, exact) or fp32
(fp8), and K is split across programs where N alone gives too few tiles to fill the GPU.

Arithmetic, so that the CPU reference is the oracle:
- int8: the int32 product is exact whatever the tiling; split-K partials are int32, summed exactly. The
  epilogue is the reference's: int32 -> fp32, times (x_scale * w_scale) in fp32, rounded once to the
  output dtype. So the kernel gives the reference's bits (sq.py's CPU path: the same int32, the same
  epilogue).
- fp8: E4M3 products are exact in fp32, their sums are not: fp32 partials, summed in a fixed order
  (deterministic), then the same epilogue. Hopper's fp8 wgmma (64-row tiles) adds its products in less than
  fp32 inside one instruction; max_num_imprecise_acc=BLOCK_K moves them into the fp32 accumulator at every
  K tile, so the error stays that of BLOCK_K-long sums (smaller tiles go through fp16 mma, exact products).

Above SMALL_M rows (prefill) the library GEMMs are compute-bound and fast: the linears keep them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SMALL_M = 64  # rows up to which the linears take this kernel


@triton.jit
def _w8a8_kernel(X, W, XS, WS, OUT, M, N, K, stride_xm, stride_wn,
                 XS_ROWS: tl.constexpr, WS_COLS: tl.constexpr, EPILOGUE: tl.constexpr, ACC_INT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """X (M, K) and W (N, K), both K-contiguous, int8 or float8e4nv. EPILOGUE (SPLIT_K 1): OUT (M, N) in the
    output dtype = acc * (xs * ws); else OUT (SPLIT_K, M, N) int32 / fp32 partial sums."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    j = tl.arange(0, BLOCK_K)
    x_rows = X + m.to(tl.int64)[:, None] * stride_xm
    w_cols = W + n.to(tl.int64)[None, :] * stride_wn
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        kk = k0 + j
        kmask = kk < K
        x = tl.load(x_rows + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if ACC_INT:
            acc += tl.dot(x, w, out_dtype=tl.int32)
        else:  # Hopper's fp8 wgmma sums in reduced precision: into the fp32 accumulator at every K tile
            acc += tl.dot(x, w, max_num_imprecise_acc=BLOCK_K)
    omask = mmask[:, None] & nmask[None, :]
    if EPILOGUE:
        if XS_ROWS:
            xs = tl.load(XS + m, mask=mmask, other=0.0)
        else:
            xs = tl.load(XS + tl.zeros([BLOCK_M], tl.int32))
        if WS_COLS:
            ws = tl.load(WS + n, mask=nmask, other=0.0)
        else:
            ws = tl.load(WS + tl.zeros([BLOCK_N], tl.int32))
        y = acc.to(tl.float32) * (xs[:, None] * ws[None, :])
        tl.store(OUT + m.to(tl.int64)[:, None] * N + n[None, :], y.to(OUT.dtype.element_ty), mask=omask)
    else:
        out = OUT + pid_k.to(tl.int64) * M * N + m.to(tl.int64)[:, None] * N + n[None, :]
        tl.store(out, acc, mask=omask)


def default_config(M: int, N: int, K: int, sms: int, fp8: bool = False) -> dict:
    """Launch shape from static sizes: the smallest BLOCK_M of 16 / 32 / 64 that holds M (tl.dot takes 16
    rows at least), 32 outputs a tile, 256 bytes of K a step (128 for E4M3 above 16 rows), no K split, 4
    stages in flight. From the launch-shape sweep on an H100 (tests/perf/gpu_quant_check.sh, 2026-12-05,
    docs/runs/h100-2026-12-05-linear.jsonl: up to 49 shapes for each linear of a LLaMA-7B layer at 1 / 16 / 64
    rows, int8 and E4M3): the best, or within 1% of it, in 17 of the 24 sweeps; mlp.up (every row count) and sq's
    attn.qkv at 64 rows were best with 3 stages or 64-wide tiles (E4M3 mlp.up at 64 rows: 37.5 us against this
    shape's 42.5). A layer's four linears at their best take 87-107 us (2.0-2.6 TB/s), against 120-192 us for
    the earlier 64 x 128 tiles split ~4 waves deep. (The E4M3 sweep at 64 rows tried only 128-byte K steps
    before its time ran out.) sms: kept for the callers; 32-wide tiles already make a wave or more at these N."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    if M > 64:  # prefill rows (EF_WO_KERNEL=triton only; auto takes torch._int_mm / _scaled_mm there)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 128 if fp8 and M > 16 else 256, "SPLIT_K": 1,
            "num_warps": 4, "num_stages": 4}


def _sm_count(device: torch.device) -> int:
    from ..attention_triton import _sm_count as sms

    return sms(device)


def launch(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
           out_dtype: torch.dtype, **cfg) -> torch.Tensor:
    """x (M, K) and weight (N, K), both int8 or both float8_e4m3fn; x_scale (M, 1) or (1,) fp32, w_scale (N,)
    or (1,) fp32 -> (M, N) in out_dtype: (x weight^T) * x_scale * w_scale."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and x.dtype == weight.dtype and x.stride(1) == 1 and weight.stride(1) == 1
    xs, ws = x_scale.reshape(-1).float().contiguous(), w_scale.reshape(-1).float().contiguous()
    assert xs.numel() in (1, M) and ws.numel() in (1, N), (xs.shape, ws.shape)
    cfg = dict(cfg or default_config(M, N, K, _sm_count(x.device) if x.is_cuda else 132, x.dtype != torch.int8))
    split = cfg["SPLIT_K"]
    # 8-bit tensor-core dots take K tiles of 32 at least (the interpreter does not check)
    assert cfg["BLOCK_K"] >= 32, cfg
    acc_int = x.dtype == torch.int8
    epilogue = split == 1
    out = torch.empty((M, N) if epilogue else (split, M, N),
                      dtype=out_dtype if epilogue else torch.int32 if acc_int else torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    wrap_triton(_w8a8_kernel)[grid](x, weight, xs, ws, out, M, N, K, x.stride(0), weight.stride(0),
                                    XS_ROWS=xs.numel() == M and M > 1, WS_COLS=ws.numel() == N and N > 1,
                                    EPILOGUE=epilogue, ACC_INT=acc_int, **cfg)
    if epilogue:
        return out
    # the reference's epilogue on the partials' sum (int32: exact; fp32: in a fixed order)
    acc = out.sum(0, dtype=out.dtype)
    return (acc.float() * (xs.reshape(-1, 1) * ws.reshape(1, -1))).to(out_dtype)


@triton_op("engine_factory::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) quantized (int8 / E4M3) -> (M, N) out_dtype, as a triton_op: torch.compile traces into the
    kernel and the decode CUDA graphs capture it."""
    return launch(x.contiguous(), weight, x_scale, w_scale, out_dtype)
