"""int4 g128 weight-only GEMV / small GEMM (batch M <= 8) in Triton's Gluon dialect, Marlin's way. EXPERIMENTAL:
the engine runs it only with $EF_WO_GLUON=1 (5-8 rows). Written and compiled offline for sm90 under the GPU
machine's Triton 3.6 (2026-12-07); on an H100 (eighth session) its CUDA tests passed, and
`tests/perf/gemv_probe.py --sections gluon,tinygemm` timed it: at batch 1 slower than tinygemm, at 8 rows faster
(the MMA's 8 columns take the rows at no cost, where tinygemm's time grows with them). A LLaMA-7B layer's four
linears, us at 1 / 8 rows: first probe, the best of nine launch shapes a linear, 103.6 / 110.4 against tinygemm's
67.8 / 145.7 (mlp.down unsplit 90-117); second probe, deeper K splits (default_launch), 89.4 / 96.4 against
66.8 / 143.5. It is bound by latency, not by its instructions: each thread keeps one or two 16-byte words in
flight, so more programs won; more words fetched ahead (registers allowing) is what to try next.

Why: every plain-Triton int4 kernel of ours (triton_wo.py) builds one fp32 level a weight and multiplies it by an
FMA, 0.23 warp-instructions a weight byte at best in the K loop's sm90 SASS, so it stops near 1.5-2 TB/s on an
H100 (tinygemm: ~1.7). Here the weights are stored on the host in the order of the
tensor cores' operand fragments (mma.sync m16n8k16, "swap": out^T = W x^T, weight rows on the MMA's 16-row side,
x^T on its 8-wide side), so that a thread's one 16-byte load holds the 32 nibbles of its A registers for four MMAs;
a lop3 makes two bf16 levels 128 + q at a time ((w >> 4j) & 0x000F000F | 0x43004300: bf16 128.0 has a ulp of 1)
straight in those registers, with no shared memory; Gluon's convert_layout(..., assert_trivial=True) checks at
compile time that the loaded layout is the operand layout. The 128 + zero offset starts each group's MMA chain as
-(128 + z) sum(x of the group) (sums precomputed per group), the scale multiplies once a group in fp32. K loop
(Triton 3.6, sm90, BN = 128, 4 warps): 189 instructions a 128-k group, 0.092 warp-instructions a weight byte, 72
registers, no spills, no LDS/STS (`python tests/perf/aot_inspect.py --grid gluon`).

Layout: repack_int4 turns our int4 storage ((N, K/2) uint8, feature 2j in the low nibble) into int32 (N/16, K/64,
32 lanes, 4 words); repack_meta the scales and zeros into fp32 (G, N/16, 8, 2, 2). A dot's logical k is a
permutation of the features (logical_to_physical_k) so that x's 16-byte load a thread holds two whole B fragments;
the weights take the same permutation. Needs N % 16 == 0 (BN | N), K % 128 == 0, groups of 128. What the
interpreter cannot check (it does not run Gluon), the CUDA tests do: the packed order of inline asm's bf16 outputs
(element 2j in the low half of register j, as assumed; NIB_ORDER is where the host would change it) and Triton's
mma_v2 lowering.
tests/test_gluon_int4.py replays the kernel's offsets, reshapes and permutes in float64 on the CPU against the
dequantized reference (the repack and the index math)."""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

GROUP = gl.constexpr(128)  # = BK: one group a K step


# ---------------------------------------------------------------- host side (tests/test_gluon_int4.py)
NIB_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble p of a word holds k-offset NIB_ORDER[p] of the thread's 8 consecutive k
# (lop3 on bits 0-3 / 16-19 after a shift by 4p gives the bf16 pair (k 2p', 2p'+1) = (nibble p', nibble p'+4))


def logical_to_physical_k(K: int) -> torch.Tensor:
    """The dot's logical k order -> x's (and the weight's) feature index: within each 64 block, logical
    32c + 8t + 4jh + 2jl + e is physical 16t + 8jh + 4jl + 2c + e (x's 16-byte load a thread then holds two whole
    mma B fragments, b0 / b1 differing in c)."""
    l = torch.arange(K)
    kb, c, t, jh, jl, e = l // 64, (l // 32) % 2, (l // 8) % 4, (l // 4) % 2, (l // 2) % 2, l % 2
    return 64 * kb + 16 * t + 8 * jh + 4 * jl + 2 * c + e


def repack_int4(w: torch.Tensor) -> torch.Tensor:
    """Our storage (N, K/2) uint8, feature 2j low nibble / 2j+1 high -> int32 (N/16, K/64, 32 lanes, 4 words):
    for 16-row block nb, 64-k block kb, lane (g, t) = 4g + t, word c*2 + h: row 16nb + 8h + g,
    logical k = 64kb + 32c + 8t + NIB_ORDER[p] in nibble p (feature logical_to_physical_k). One warp's 16 bytes a
    lane = 512 contiguous bytes."""
    N, K2 = w.shape
    K = 2 * K2
    assert N % 16 == 0 and K % 64 == 0
    q = torch.stack([w & 0xF, w >> 4], -1).reshape(N, K).to(torch.int64)          # (N, K) levels 0..15
    q = q[:, logical_to_physical_k(K)]                                              # logical k order
    q = q.view(N // 16, 2, 8, K // 64, 2, 4, 8)                                      # nb, h, g, kb, c, t, e
    q = q[..., NIB_ORDER]                                                            # e -> nibble position p
    word = (q << (4 * torch.arange(8, device=q.device))).sum(-1)                                      # nb, h, g, kb, c, t
    word = word.permute(0, 3, 2, 5, 4, 1).reshape(N // 16, K // 64, 32, 4)         # nb, kb, (g, t), (c, h)
    return (word - ((word >= 2**31).to(torch.int64) << 32)).to(torch.int32).contiguous()


def repack_meta(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """scale (N, G), zero (N, G) uint8 or None -> fp32 (G, N/16, 8 g, 2 h, 2 {scale, -(128 + zero)}) (or without the
    last dim when zero is None: zb = 128, z = 0): a thread's rows g, g + 8 of a 16-row block in one 16-byte load."""
    N, G = scale.shape
    s = scale.float().t().reshape(G, N // 16, 2, 8).transpose(2, 3)              # G, nb, g, h
    if zero is None:
        return s.contiguous()
    zb = -(128.0 + zero.float()).t().reshape(G, N // 16, 2, 8).transpose(2, 3)
    return torch.stack([s, zb], -1).contiguous()


# ---------------------------------------------------------------- kernel
@gluon.constexpr_function
def w_layout(NB, NW):
    """Linear layout of the dequant tensor [NB * 2 (nb, kb), 128 words (g, t, c, h), 8 (e)] such that its
    permute/reshape to [16 NB, 128] is exactly DotOperandLayout(0, mma, k_width=8)."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [1, 0, 0]]  # e (k 1,2,4), h (row 8), c (k 32), kb (k 64)
    warp = []
    nb = 2
    for _ in range(NW.bit_length() - 1):
        warp.append([nb, 0, 0])
        nb *= 2
    while nb < 2 * NB:  # more 16-row blocks than warps: registers (row 16 NW ...)
        reg.append([nb, 0, 0])
        nb *= 2
    lane = [[0, 4, 0], [0, 8, 0], [0, 16, 0], [0, 32, 0], [0, 64, 0]]  # t (k 8, 16), g (rows 1, 2, 4)
    return gl.DistributedLinearLayout(reg, lane, warp, [], [2 * NB, 128, 8])


@gluon.constexpr_function
def x_layout(NW):
    """[2 kb, 4 t, 2 jh, 8 v, 8 n]: v (e, c, jl) then jh, kb in registers, t and n on lanes, warps broadcast."""
    reg = [[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]
    lane = [[0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4]]
    warp = [[0, 0, 0, 0, 0]] * (NW.bit_length() - 1)
    return gl.DistributedLinearLayout(reg, lane, warp, [], [2, 4, 2, 8, 8])


@gluon.constexpr_function
def meta_layout(NB, NW, HAS_ZERO):
    """[NB, 8 g, 2 h (, 2 sz)]: (sz,) h then NB beyond warps in registers; lanes: t broadcast, g; warps: nb."""
    R = 4 if HAS_ZERO else 3
    def v(d, x):
        b = [0] * R
        b[d] = x
        return b
    reg = ([v(3, 1)] if HAS_ZERO else []) + [v(2, 1)]
    warp = []
    nb = 1
    for _ in range(NW.bit_length() - 1):
        warp.append(v(0, nb))
        nb *= 2
    while nb < NB:
        reg.append(v(0, nb))
        nb *= 2
    lane = [[0] * R, [0] * R, v(1, 1), v(1, 2), v(1, 4)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [NB, 8, 2, 2] if HAS_ZERO else [NB, 8, 2])


@gluon.constexpr_function
def meta_load_layout(NB, NW):
    """meta_layout(HAS_ZERO) with (h, sz) flattened into one dim of 4: the load's 16 contiguous bytes."""
    L = meta_layout(NB, NW, True)
    f = lambda b: [b[0], b[1], b[2] * 2 + b[3]]
    return gl.DistributedLinearLayout([f(b) for b in L.reg_bases], [f(b) for b in L.lane_bases], [f(b) for b in L.warp_bases], [], [NB, 8, 4])


@gluon.jit
def _dequant(words):
    """int32 words (broadcast 8x along the last dim) -> bf16 128 + q, 8 a word, packed pairs, lop3 + shifts."""
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xea; shr.u32 t, $4, 4; "
        "lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xea; shr.u32 t, $4, 8; lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xea; "
        "shr.u32 t, $4, 12; lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xea; }",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [words], gl.bfloat16, True, 8)


@gluon.jit
def wo_int4_mma_kernel(X, WP, SZ, XS, OUT, M, N, K, stride_xm,
                       BN: gl.constexpr, SPLIT_K: gl.constexpr, NW: gl.constexpr,
                       XTRIV: gl.constexpr = False, HAS_ZERO: gl.constexpr = True, PREFETCH: gl.constexpr = 0):
    """PREFETCH D (0, 1, 2): the weight words of the groups D steps ahead loaded before a step's MMAs (registers,
    4 a step a thread), so that a program keeps D + 1 steps of its bytes in flight (no software pipelining here
    otherwise: a load is used in the step that issues it); past the last group the last is loaded again, unused."""
    NB: gl.constexpr = BN // 16
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    L3: gl.constexpr = w_layout(NB, NW)
    P2: gl.constexpr = gl.SliceLayout(2, L3)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    G = K // GROUP
    # packed weight tile offsets: row r = nb * 2 + kb, col = word (lane * 4 + c * 2 + h)
    r = gl.arange(0, 2 * NB, gl.SliceLayout(1, P2))
    col = gl.arange(0, 128, gl.SliceLayout(0, P2))
    KB64 = K // 64
    w_off = gl.expand_dims((pid_n * NB + r // 2) * (KB64 * 128) + (r % 2) * 128, 1) + gl.expand_dims(col, 0)
    dummy = gl.zeros([1, 1, 8], gl.int32, L3)
    # x tile: loaded as [2 (kb), 4 (t), 2 (jh), 8 (v = 4 jl + 2 c + e), 8 (n)], physical
    # k = 64 kb + 16 t + 8 jh + v (16 contiguous bytes a thread), then viewed in the dot's logical k order
    # 64 kb + 32 c + 8 t + 4 jh + 2 jl + e, so that a 16-byte load holds two whole B fragments (b0 / b1 differ in c)
    XL: gl.constexpr = x_layout(NW)
    i0 = gl.arange(0, 2, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, XL)))))
    i1 = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, XL)))))
    i2 = gl.arange(0, 2, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, XL)))))
    i3 = gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, XL)))))
    i4 = gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XL)))))
    o01 = gl.expand_dims(i0 * 64, 1) + gl.expand_dims(i1 * 16, 0)                      # [2, 4]
    o012 = gl.expand_dims(o01, 2) + gl.expand_dims(gl.expand_dims(i2 * 8, 0), 1)        # [2, 4, 2]
    o0123 = gl.expand_dims(o012, 3) + gl.expand_dims(gl.expand_dims(gl.expand_dims(i3, 0), 1), 2)
    n4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(i4, 0), 1), 2), 3)  # [1, 1, 1, 1, 8]
    x_off = gl.expand_dims(o0123, 4) + gl.minimum(n4, M - 1) * stride_xm  # columns >= M repeat row M-1: no mask
    # per-row / per-column epilogue vectors in the accumulator layout
    rows = pid_n * BN + gl.arange(0, BN, gl.SliceLayout(1, mma))
    cols = gl.arange(0, 8, gl.SliceLayout(0, mma))
    acc = gl.zeros([BN, 8], gl.float32, mma)
    # scale (and 128 + zero) of the tile's rows: [NB, 8, 2 (,2)] contiguous a thread
    ML: gl.constexpr = meta_layout(NB, NW, HAS_ZERO)
    if HAS_ZERO:
        MLL: gl.constexpr = meta_load_layout(NB, NW)
        mb = gl.arange(0, NB, gl.SliceLayout(1, gl.SliceLayout(2, MLL)))
        mg = gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(2, MLL)))
        me = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(1, MLL)))
        m_off = gl.expand_dims(gl.expand_dims((pid_n * NB + mb) * 32, 1) + gl.expand_dims(mg * 4, 0), 2) \
            + gl.expand_dims(gl.expand_dims(me, 0), 1)
        SZW: gl.constexpr = 4
    else:
        MSL: gl.constexpr = gl.SliceLayout(2, ML)
        mb = gl.arange(0, NB, gl.SliceLayout(1, MSL))
        mg = gl.arange(0, 8, gl.SliceLayout(0, MSL))
        mh = gl.arange(0, 2, gl.SliceLayout(0, gl.SliceLayout(1, ML)))
        m_off = gl.expand_dims(gl.expand_dims((pid_n * NB + mb) * 16, 1) + gl.expand_dims(mg * 2, 0), 2) \
            + gl.expand_dims(gl.expand_dims(mh, 0), 1)
        SZW: gl.constexpr = 2
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    if PREFETCH >= 1:
        ahead1 = gl.load(WP + w_off + gl.minimum(pid_k, G - 1) * 256)
    if PREFETCH >= 2:
        ahead2 = gl.load(WP + w_off + gl.minimum(pid_k + SPLIT_K, G - 1) * 256)
    for g in range(pid_k, G, SPLIT_K):
        if PREFETCH == 1:
            words = ahead1
            ahead1 = gl.load(WP + w_off + gl.minimum(g + SPLIT_K, G - 1) * 256)
        elif PREFETCH == 2:
            words = ahead1
            ahead1 = ahead2
            ahead2 = gl.load(WP + w_off + gl.minimum(g + 2 * SPLIT_K, G - 1) * 256)
        else:
            words = gl.load(WP + w_off + g * 256)                                     # 16 B a thread a 64 k
        wq = _dequant(gl.expand_dims(words, 2) + dummy)                               # [2NB, 128, 8] bf16
        wq = gl.reshape(wq, [NB, 2, 8, 4, 2, 2, 8])                                   # nb kb g t c h e
        wq = gl.permute(wq, [0, 5, 2, 1, 4, 3, 6])                                    # nb h g kb c t e
        wq = gl.reshape(wq, [BN, GROUP])
        a = gl.convert_layout(wq, a_l, assert_trivial=True)
        xv = gl.load(X + x_off + g * GROUP)                                              # kb t jh v n
        xv = gl.reshape(xv, [2, 4, 2, 2, 2, 2, 8])                                    # kb t jh jl c e n
        xv = gl.permute(xv, [0, 4, 1, 2, 3, 5, 6])                                    # kb c t jh jl e n
        xb = gl.convert_layout(gl.reshape(xv, [GROUP, 8]), b_l, assert_trivial=XTRIV)
        xs = gl.load(XS + g * 8 + cols)                                               # sum of x over the group
        meta = gl.load(SZ + g * (N * SZW // 2) + m_off)
        if HAS_ZERO:
            meta = gl.convert_layout(gl.reshape(meta, [NB, 8, 2, 2]), ML, assert_trivial=True)
            s, zb = gl.split(meta)                                                    # [NB, 8, 2] each
            zb = gl.convert_layout(gl.reshape(gl.permute(zb, [0, 2, 1]), [BN]), row_l, assert_trivial=True)
            init = gl.expand_dims(zb, 1) * gl.expand_dims(xs, 0)                      # -(128 + z) sum(x)
        else:
            s = meta
            init = gl.zeros([BN, 8], gl.float32, mma) + gl.expand_dims(xs * -128.0, 0)
        s = gl.convert_layout(gl.reshape(gl.permute(s, [0, 2, 1]), [BN]), row_l, assert_trivial=True)
        t = mma_v2(a, xb, init)                                                       # sum x (q - z)
        acc += gl.expand_dims(s, 1) * t
    o_off = gl.expand_dims(rows, 1) + gl.expand_dims(cols * N, 0)
    o_mask = gl.expand_dims(rows < N, 1) & gl.expand_dims(cols < M, 0)
    if SPLIT_K == 1:
        gl.store(OUT + o_off, acc, mask=o_mask)
    else:
        gl.atomic_add(OUT + o_off, acc, mask=o_mask, sem="relaxed")


def default_launch(N: int, K: int, sms: int) -> tuple[int, int, int, int]:
    """(BN, SPLIT_K, warps, PREFETCH) from static sizes: 64-row tiles, 4 warps, one group's words fetched ahead,
    K split (fp32 atomics into a zeroed output: a memset more a call) until there are 16 programs an SM, at most 16
    ways and 2 groups a split. The kernel waits on memory latency (a thread keeps one or two 16-byte words in
    flight), so more programs win. H100, 2026-12-07, eighth session, gemv_probe --sections gluon, a LLaMA-7B
    layer's four linears, us at 1 / 8 rows: this rule (attn.qkv split 16, attn.o 16, mlp.up 8, mlp.down 16)
    89.4 / 96.4, the per-linear bests of 11 shapes 89.0 / 94.8, tinygemm 66.8 / 143.5; split 4 everywhere
    104.7 / 110.8 and the first rule (128-row tiles where they alone gave each SM a program, splits while the
    programs stayed within two an SM) 136.5 / 150.8. Two groups ahead won at splits 4-8 on the narrow linears
    (attn.o split 8: 13.38 against 13.81) and are not timed at 16; they spill 8 bytes of stack at BN 64 under
    Triton 3.6."""
    split = 1
    while (N // 64) * split < 16 * sms and split < 16 and K // 128 // (split * 2) >= 2:
        split *= 2
    return 64, split, 4, 1


def operands(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> tuple | None:
    """Our int4 linear's tensors (weight (N, K/2) uint8, scale and zero (N, groups)) repacked for linear(), with
    its launch shape (default_launch), made once at load (one more copy of the int4 bytes in GPU memory), or None
    where this kernel does not apply (not CUDA, groups other than 128, N not a multiple of 64, scales not bf16,
    sm < 80)."""
    N, K = weight.shape[0], weight.shape[1] * 2
    if weight.device.type != "cuda" or K % 128 or N % 64 or scale.numel() != N * (K // 128) \
            or scale.dtype != torch.bfloat16 or torch.cuda.get_device_capability(weight.device) < (8, 0):
        return None  # (bf16 mma.sync: sm >= 80; the engines that run it are bf16)
    z = None if zero is None else zero.reshape(N, -1)
    # repacked on the host: the int64 intermediates of a 4096 x 11008 weight take ~1 GB
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    return repack_int4(weight.cpu()).to(weight.device), repack_meta(scale.reshape(N, -1), z), N, K, \
        default_launch(N, K, sms)


@torch.library.custom_op("engine_factory::gluon_int4_mm", mutates_args=())
def _mm(x: torch.Tensor, xs: torch.Tensor, wp: torch.Tensor, sz: torch.Tensor, N: int, K: int, BN: int, split: int,
        warps: int, prefetch: int) -> torch.Tensor:
    """(M, N) fp32 from x (M <= 8, K) bf16 and its groups' sums xs (G, 8) fp32: an opaque op to torch.compile (it
    does not trace Gluon kernels), a plain launch that CUDA graphs capture."""
    out = (torch.zeros if split > 1 else torch.empty)(x.shape[0], N, dtype=torch.float32, device=x.device)
    wo_int4_mma_kernel[(N // BN, split)](x, wp, sz, xs, out, x.shape[0], N, K, x.stride(0), BN=BN, SPLIT_K=split,
                                         NW=warps, HAS_ZERO=sz.dim() == 5, PREFETCH=prefetch, num_warps=warps)
    return out


@_mm.register_fake
def _(x, xs, wp, sz, N, K, BN, split, warps, prefetch):
    return x.new_empty(x.shape[0], N, dtype=torch.float32)


def _group_sums(x: torch.Tensor, K: int) -> torch.Tensor:
    """x (M, K) -> (K / 128, 8) fp32: each group's sum of x a row, padded to the MMA's 8 columns (plain torch ops:
    under torch.compile one fused reduction)."""
    M = x.shape[0]
    return torch.nn.functional.pad(x.float().view(M, K // 128, 128).sum(-1).t(), (0, 8 - M)).contiguous()


def linear(x: torch.Tensor, ops: tuple) -> torch.Tensor:
    """x (..., K) bf16, at most 8 rows -> (..., N) in x's dtype; ops = operands(...)."""
    wp, sz, N, K, shape = ops
    x2 = x.reshape(-1, K).contiguous()
    y = _mm(x2, _group_sums(x2, K), wp, sz, N, K, *shape)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def launch(x: torch.Tensor, wp: torch.Tensor, sz: torch.Tensor, N: int, K: int, BN: int = 128, SPLIT_K: int = 1,
           num_warps: int = 4, PREFETCH: int = 0) -> torch.Tensor:
    """x (M <= 8, K) bf16, wp = repack_int4(weight), sz = repack_meta(scale, zero) -> (M, N) fp32. xs: the
    groups' sums of x (fp32), padded to 8 columns; SPLIT_K > 1: fp32 atomics into a zeroed output."""
    assert x.dtype == torch.bfloat16 and 0 < x.shape[0] <= 8 and x.stride(1) == 1, (x.dtype, x.shape, x.stride())
    assert N % BN == 0 and K % 128 == 0 and BN // 16 >= num_warps, (N, K, BN, num_warps)  # (w_layout: a warp a 16 rows)
    return _mm(x, _group_sums(x, K), wp, sz, N, K, BN, SPLIT_K, num_warps, PREFETCH)
