"""Small Triton kernels that run one @triton.jit helper of ours and store what it returns, so that a test can
look at it directly (imported by the interpreted processes of tests/test_quant.py: triton at import)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.quant import triton_wo as wo


@triton.jit
def _gemv_tile_probe(W, OUT, N, K, stride_wn, k0, INT4: tl.constexpr, HALF: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    n = tl.arange(0, BLOCK_N)
    j = tl.arange(0, HALF)
    raw = wo._gemv_tile(W + n.to(tl.int64)[:, None] * stride_wn, n < N, k0, j, K, INT4, HALF, EVEN_K)
    tl.store(OUT + n[:, None] * HALF + j[None, :], raw)


def gemv_tile(w: torch.Tensor, N: int, K: int, k0: int, block_k: int, int4: bool) -> torch.Tensor:
    """What the GEMV loads for the tile at feature k0 of rows 0..N-1 of w (bytes as stored; rows may be longer
    than K's bytes: what lies past K in them must not come back)."""
    half = block_k // 2 if int4 else block_k
    out = torch.full((16, half), 77, dtype=w.dtype)
    _gemv_tile_probe[(1,)](w, out, N, K, w.stride(0), k0, INT4=int4, HALF=half, EVEN_K=K % block_k == 0,
                           BLOCK_N=16)
    return out


def check_gemv_tile_masks() -> None:
    """A tile partly or wholly past K (fetched ahead of the last step: PREFETCH) or past N reads zeros there
    and the stored bytes elsewhere: int8, int4 with whole tiles (EVEN_K: no mask along K but the tile's start)
    and int4 with a partial last tile. The rows are 128 bytes long whatever K, all bytes nonzero, so a missing
    mask shows as data."""
    g = torch.Generator().manual_seed(0)
    for int4, K, block_k in ((False, 96, 64), (True, 128, 64), (True, 96, 64)):
        w = torch.randint(1, 100, (16, 128), generator=g, dtype=torch.int16).to(torch.uint8 if int4 else torch.int8)
        nbytes = K // 2 if int4 else K
        for k0 in range(0, K + 2 * block_k, block_k):  # whole, partial, past K (one and two steps ahead)
            for N in (16, 11):  # rows past N: zeros too
                got = gemv_tile(w, N, K, k0, block_k, int4)
                b0 = k0 // 2 if int4 else k0
                want = torch.zeros_like(got)
                live = max(0, min(got.shape[1], nbytes - b0))
                want[:N, :live] = w[:N, b0:b0 + live]
                assert torch.equal(got, want), (int4, K, k0, N, got, want)


@triton.jit
def _nibble_levels_probe(Q, Z, OUT, LEVELS, IS_BF16: tl.constexpr):
    i = tl.arange(0, 16)
    dt = tl.bfloat16 if IS_BF16 else tl.float16
    tl.store(OUT + i, wo._nibble_off(tl.load(Q + i), dt))
    if not IS_BF16:  # (the interpreter has no bf16 arithmetic: the subtraction in bf16 is the CUDA tests')
        tl.store(LEVELS + i, wo._nibble_levels(tl.load(Q + i), tl.load(Z + i), dt))


def check_nibble_levels() -> None:
    """The int4 MAGIC levels (triton_wo._nibble_levels): nibbles 0..15 OR-ed into bf16 128.0 / fp16 1024.0 are
    exactly 128 + q / 1024 + q (_nibble_off), and with zero points 15..0 so made and subtracted in 16 bits, exactly
    q - z (fp16 here)."""
    q = torch.arange(16, dtype=torch.int32)
    z = torch.arange(15, -1, -1, dtype=torch.int32)
    for dtype, off in ((torch.bfloat16, 128.0), (torch.float16, 1024.0)):
        out, levels = torch.zeros(16, dtype=dtype), torch.zeros(16, dtype=dtype)
        _nibble_levels_probe[(1,)](q, z, out, levels, IS_BF16=dtype == torch.bfloat16)
        assert torch.equal(out.float(), off + q.float()), (dtype, out)
        if dtype == torch.float16:
            assert torch.equal(levels.float(), (q - z).float()), (dtype, levels)
