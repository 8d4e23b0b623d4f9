"""Small Triton kernels that run one @triton.jit helper of ours and store what it returns, so that a test can
look at it directly (imported by the interpreted processes of tests/test_quant.py: triton at import)."""
from __future__ import annotations

import inspect

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


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """runtime/model.py's _Norm (RMS) on h."""
    from runtime.model import _Norm

    norm = _Norm.__new__(_Norm)
    norm.kind, norm.eps, norm.weight, norm.bias = "rms", eps, weight, None
    return norm(h)


def check_gemv_fusions(device: str = "cpu", dtypes=(torch.float32, torch.float16)) -> None:
    """The batch-1 GEMV with its fusions (launch's norm, gate, residual) against the plain ops it replaces (the
    same kernel unfused, then torch's norm / silu-gate / add), int8 and int4 (groups, per channel), split K or not,
    the split added in the kernel (REDUCE) or by launch; fp32 and fp16 (bf16 arithmetic: on CUDA only; there also
    the default launches at a LLaMA-7B layer's K, with PRMT)."""
    from runtime.quant import MODES

    g = torch.Generator().manual_seed(11)
    wide = (("int8_wo", 4096, {}), ("int4_wo_g128", 4096, {}), ("int8_wo", 11008, {}), ("int4_wo", 11008, {})) \
        if device == "cuda" else ()
    for dt in dtypes:
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]
        for mode, K, cfg in (*wide, ("int8_wo", 320, {}), ("int4_wo_g64", 256, {}), ("int4_wo", 288, {}),
                             ("int8_wo", 320, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3, "MAGIC": True,
                                               "REDUCE": True}),
                             ("int4_wo_g64", 256, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2,
                                                   "MAGIC": True}),
                             ("int4_wo_g64", 256, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2,
                                                   "MAGIC": True, "REDUCE": True})):
            N = 1024 if K >= 4096 else 40
            t = {k: v.to(device) for k, v in MODES[mode].quantize(torch.randn(N, K, generator=g), dt).items()}
            bits = 8 if mode == "int8_wo" else 4
            ops = (t["weight"], t["scale"], t.get("zero"), bits)

            def plain(x):
                return wo.launch(x, *ops, **cfg)

            h = (torch.randn(1, K, generator=g) * 3).to(device, dt)
            nw = (1 + 0.3 * torch.randn(K, generator=g)).to(device, dt)
            gu = torch.randn(1, 2 * K, generator=g).to(device, dt)
            # (the residual as large as the outputs: a dropped or doubled one shows above bf16's tolerance)
            res = (torch.randn(1, N, generator=g).to(device) * plain(h).float().abs().max()).to(dt)
            gate, up = gu.float().chunk(2, dim=-1)
            cases = (("norm", wo.launch(h, *ops, norm=nw, eps=1e-5, **cfg), plain(_rms(h, nw, 1e-5))),
                     ("gate", wo.launch(gu, *ops, gate=True, **cfg), plain((torch.nn.functional.silu(gate) * up).to(dt))),
                     ("residual", wo.launch(h, *ops, residual=res, **cfg), res + plain(h)),
                     ("gate+residual", wo.launch(gu, *ops, gate=True, residual=res, **cfg),
                      res + plain((torch.nn.functional.silu(gate) * up).to(dt))))
            for name, got, want in cases:
                assert got.dtype == dt and got.shape == (1, N), (name, got.shape)
                err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
                assert err <= tol, (mode, dt, cfg, name, err)


def check_fused_decode(modes=("int8_wo", "int4_wo"), dtype=torch.float32) -> None:
    """A random 2-layer LLaMA-like decoder (tests/helpers.py) with each weight-only mode, its linears on the Triton
    kernels (interpreted on CPU; per channel: its intermediate size, 80, takes no int4 group): greedy decode at batch 1 with the fusions ($EF_WO_FUSE=1) gives the logits of the
    same kernels unfused, and every fusion is taken (4 a layer: the norms before qkv and up, the gate before down,
    the residuals after o and down; and the final norm before the lm_head, quantized too: precision.quant_lm_head);
    prefill (several rows) takes none but the lm_head's (its last row only)."""
    from helpers import random_decoder_tensors
    from runtime.model import Decoder
    from runtime.quant import MODES

    spec, dense = random_decoder_tensors("rope_gqa", dtype, "cpu")
    calls = []
    launch = wo.launch

    def counted(*a, **kw):
        b = inspect.signature(launch).bind(*a, **kw)
        b.apply_defaults()
        c = b.arguments
        calls.append((c["x"].shape[0], c["norm"] is not None, c["gate"], c["residual"] is not None))
        return launch(*a, **kw)

    wo.launch = counted
    try:
        for mode in modes:
            t = {}
            for name, w in dense.items():
                if name.endswith(("qkv.weight", "attn.o.weight", "up.weight", "down.weight", "lm_head.weight")):
                    t.update({name[:-len("weight")] + k: v for k, v in MODES[mode].quantize(w, dtype).items()})
                else:
                    t[name] = w
            runs = []
            for fuse in (False, True):
                wo.FUSE = fuse
                d = Decoder(spec, t, quant=mode, quant_lm_head=True)
                for lin in [d.quant_head] + [x for layer in d.layers for x in (layer.qkv, layer.o, layer.up, layer.down)]:
                    lin.kernel = "cuda"  # the Triton path (cuda_linear, fused_linear) on CPU tensors
                    lin.init_fusions()
                d.allocate_cache(1, 40)
                calls.clear()
                logits, pos, out = d.prefill(torch.tensor([3, 9, 27, 81]), [4]), torch.tensor([4]), []
                assert [c for c in calls if any(c[1:])] == ([(1, True, False, False)] if fuse else []), calls
                for _ in range(6):
                    tok = logits.argmax(-1)
                    calls.clear()
                    logits = d.decode(tok, pos)
                    out.append(logits)
                    pos = pos + 1
                    fused = sum(1 for c in calls if any(c[1:]))
                    assert fused == (4 * spec.num_layers + 1 if fuse else 0), (mode, fuse, calls)
                runs.append(torch.stack(out))
            err = ((runs[1] - runs[0]).abs().max() / runs[0].abs().max()).item()
            assert err <= 1e-4, (mode, err)  # fp32 sums in another order (the rstd; MAGIC offsets cost int4 ~4 bits)
    finally:
        wo.launch, wo.FUSE = launch, False
