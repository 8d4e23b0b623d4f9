"""runtime/quant/gluon_int4.py, the experimental Gluon int4 MMA GEMV: its host-side repack and the kernel's index
math on the CPU (Triton's interpreter does not run Gluon), the kernel itself on CUDA."""
import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="needs triton with its Gluon dialect (pip install triton)")

from runtime.quant import gluon_int4 as g  # noqa: E402
from runtime.quant.int4_wo import dequantize  # noqa: E402


def _operands(N: int, K: int, M: int, zero: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scale = torch.rand(N, K // 128, generator=gen) * 0.01
    z = torch.randint(0, 16, (N, K // 128), dtype=torch.uint8, generator=gen) if zero else None
    x = torch.randn(M, K, generator=gen).bfloat16()
    # the oracle: our own int4 reference (runtime/quant/int4_wo.py), in float64; no zero points: q as stored, as
    # triton_wo's kernels take them (zero None)
    zz = z if zero else torch.zeros(N, K // 128, dtype=torch.uint8)
    ref = x.double() @ dequantize(w, scale.double(), zz, torch.float64).t()
    return w, scale, z, x, ref


def _emulate(x, wp, sz, N: int, K: int, BN: int) -> torch.Tensor:
    """The kernel's data flow in float64: the same offsets, reshapes and permutes (their meaning does not depend on
    layouts), the inline asm as what it puts in each packed bf16 element (element 2j + b of a word: nibble j + 4b,
    128 + q), an MMA as a matrix product from the chain's start value."""
    M, NB, G = x.shape[0], BN // 16, K // 128
    has_zero = sz.dim() == 5
    xs8 = torch.zeros(G, 8, dtype=torch.float64)
    xs8[:, :M] = x.double().view(M, G, 128).sum(-1).t()
    words_all = wp.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    meta_all = sz.reshape(-1).double()
    p_of_e = torch.tensor([e // 2 + 4 * (e % 2) for e in range(8)])
    r, col = torch.arange(2 * NB), torch.arange(128)
    i0, i1, i2, i3, i4 = (torch.arange(n) for n in (2, 4, 2, 8, 8))
    kp = i0[:, None, None, None] * 64 + i1[None, :, None, None] * 16 + i2[None, None, :, None] * 8 + i3
    x_k, x_row = kp[..., None].expand(2, 4, 2, 8, 8), torch.clamp(i4, max=M - 1).expand(2, 4, 2, 8, 8)
    mb, mg = torch.arange(NB), torch.arange(8)
    out = torch.zeros(N, 8, dtype=torch.float64)
    for pid_n in range(N // BN):
        acc = torch.zeros(BN, 8, dtype=torch.float64)
        w_off = ((pid_n * NB + r // 2) * (K // 64 * 128) + (r % 2) * 128)[:, None] + col[None, :]
        for grp in range(G):
            nib = (words_all[w_off + grp * 256][..., None] >> (4 * p_of_e)) & 0xF  # [2NB, 128, 8]
            wq = (128 + nib).double().reshape(NB, 2, 8, 4, 2, 2, 8).permute(0, 5, 2, 1, 4, 3, 6).reshape(BN, 128)
            xb = x.double()[x_row, grp * 128 + x_k].reshape(2, 4, 2, 2, 2, 2, 8).permute(0, 4, 1, 2, 3, 5, 6)
            xb = xb.reshape(128, 8)
            if has_zero:
                m_off = ((pid_n * NB + mb) * 32)[:, None, None] + (mg * 4)[None, :, None] + torch.arange(4)
                meta = meta_all[grp * (N * 2) + m_off].reshape(NB, 8, 2, 2)
                s, zb = meta[..., 0], meta[..., 1].permute(0, 2, 1).reshape(BN)
                init = zb[:, None] * xs8[grp][None, :]
            else:
                m_off = ((pid_n * NB + mb) * 16)[:, None, None] + (mg * 2)[None, :, None] + torch.arange(2)
                s = meta_all[grp * N + m_off].reshape(NB, 8, 2)
                init = (xs8[grp] * -128.0)[None, :].expand(BN, 8)
            acc += s.permute(0, 2, 1).reshape(BN)[:, None] * (wq @ xb + init)
        out[pid_n * BN:(pid_n + 1) * BN] = acc
    return out[:, :M].t()


@pytest.mark.parametrize("M,zero,BN", [(1, True, 128), (3, True, 64), (8, False, 128)])
def test_repack_and_the_kernels_index_math_give_the_reference(M, zero, BN):
    """Our int4 storage repacked into MMA-fragment order, read back by the kernel's own offsets and permutes (the
    dot's logical k order included), gives x W^T of the dequantized weight; without zero points only the scales
    are repacked, and the levels are q as stored."""
    N, K = 256, 1024
    w, scale, z, x, ref = _operands(N, K, M, zero)
    sz = g.repack_meta(scale, z)
    got = _emulate(x, g.repack_int4(w), sz, N, K, BN)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-9), (got - ref).abs().max()


def test_the_host_side_runs_where_the_weights_are_and_under_torch_compile():
    """The repack keeps to its input's device (meta: no data, the same ops as on CUDA); the groups' sums of x,
    plain torch ops around the opaque kernel op, trace whole (fullgraph) and give the eager sums."""
    w = torch.empty(256, 512, dtype=torch.uint8, device="meta")
    wp = g.repack_int4(w)
    assert wp.device.type == "meta" and wp.shape == (16, 16, 32, 4) and wp.dtype == torch.int32
    x = torch.randn(3, 1024).bfloat16()
    sums = torch.compile(g._group_sums, fullgraph=True, backend="eager")(x, 1024)
    assert sums.shape == (8, 8) and torch.equal(sums, g._group_sums(x, 1024))
    assert torch.allclose(sums[:, :3], x.float().view(3, 8, 128).sum(-1).t()) and not sums[:, 3:].any()
    scale = torch.rand(256, 8).bfloat16()
    assert g.operands(torch.zeros(256, 512, dtype=torch.uint8), scale, None) is None  # (not CUDA)


def test_the_dots_k_order_is_a_permutation_within_64_blocks():
    k = g.logical_to_physical_k(256)
    assert sorted(k.tolist()) == list(range(256))
    assert torch.equal(k // 64, torch.arange(256) // 64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("M,BN,split,warps,ahead", [(1, 128, 1, 4, 0), (1, 64, 1, 4, 1), (5, 128, 4, 8, 1),
                                                    (8, 256, 1, 4, 0), (2, 64, 3, 4, 2)])
def test_gluon_int4_kernel_on_cuda(M, BN, split, warps, ahead):
    """The kernel against our int4 reference (fp32 accumulation over bf16 levels and x: relative to the largest
    output, within bf16's rounding of x's products)."""
    N, K = 512, 2048
    w, scale, z, x, ref = _operands(N, K, M, True, seed=M)
    got = g.launch(x.cuda(), g.repack_int4(w).cuda(), g.repack_meta(scale, z).cuda(), N, K, BN=BN, SPLIT_K=split,
                   num_warps=warps, PREFETCH=ahead)
    err = (got.cpu().double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
def test_int4_linear_with_the_gluon_kernel_on_cuda_eager_and_compiled(monkeypatch):
    """$EF_WO_GLUON=1: the engine's int4 g128 linear takes the Gluon kernel for 5-8 rows in bf16 (eager, and
    compiled with the op opaque to Inductor), and its other paths on either side, against the same linear's
    plain-torch reference."""
    from runtime.quant import MODES, make_linear

    monkeypatch.setenv("EF_WO_GLUON", "1")
    w = torch.randn(384, 1024, generator=torch.Generator().manual_seed(3))
    stored = {f"l.{k}": v.cuda() for k, v in MODES["int4_wo_g128"].quantize(w, torch.bfloat16).items()}
    lin = make_linear("int4_wo_g128", stored, "l")
    assert lin.gluon is not None
    ref = make_linear("int4_wo_g128", {k: v.cpu() for k, v in stored.items()}, "l")
    ref.kernel = "torch"
    step = torch.compile(lambda x: lin(x), fullgraph=True)
    real, took = g.linear, []
    for M in (1, 4, 5, 8):
        x = torch.randn(M, 1024, generator=torch.Generator().manual_seed(M)).bfloat16()
        want = ref(x.float()).double()
        monkeypatch.setattr(g, "linear", lambda *a, M=M: took.append(M) or real(*a))  # (eager only: a side effect)
        eager = lin(x.cuda())
        monkeypatch.setattr(g, "linear", real)
        for got in (eager, step(x.cuda())):
            assert got.dtype == torch.bfloat16 and got.shape == (M, 384)
            err = (got.cpu().double() - want).abs().max() / want.abs().max()
            assert err < 1.6e-2, (M, err)
    assert took == [5, 8]  # the Gluon kernel for 5-8 rows only
