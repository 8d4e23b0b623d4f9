"""Split-K flash-decoding in Triton: the "triton" entry of runtime/attention.py.

Stage 1, grid (B, nkv, splits): program (b, g, s) takes the s-th of `splits` equal chunks of sequence
b's live positions 0..pos[b] (chunk = ceil(L / splits) rounded up to BLOCK_N) and runs online softmax
over it for the whole query group of KV head g (each K/V block is read once for its G = nh / nkv
query heads, as rows of one tl.dot). Chunks past L exit at once: the cost follows the live length
while the grid depends only on shapes, so it is the same launch on every step (CUDA graphs).
Stage 2, grid (B, nh): combines the splits' partial outputs with their log-sum-exp. When one split
is enough to fill the GPU, stage 1 writes the output directly and stage 2 is not launched. With REDUCE
($EF_ATTN_REDUCE=1, untimed: off by default) there is no stage 2: the last program of a (b, g) to arrive (a
counter in LOCKS, zeros at launch) combines the splits, in their order (the bits do not depend on which came
last), as the weight-only GEMV's in-kernel split-K sum does; at batch 1 the stage-2 kernel costs 48-50 µs a
7B decode step on the H100 and H200 (32 launches), a fill of the counters takes its place.

Softmax runs in base 2 (scores pre-multiplied by log2 e); ALiBi adds slope * (j - pos) in fp32.
Rotary (when given its tables): q arrives unrotated and each program rotates its rows at pos[b] as the
compiled decoder does (cos / sin rounded to q's dtype, q cos + rotate_half(q) sin in fp32, rounded once; the
eager decoder rounds each product, up to an ulp apart): the decoder's separate q-rotary kernel a layer goes.
pos[b] must be a row of the tables (the plan caps max_seq_len at max_position_embeddings, and the decoder
indexes the same tables for k in the same step).

A quantized cache (int8 or fp8 E4M3, runtime/kv_cache.py) is loaded as stored (1 byte an element) and
converted to the queries' dtype in registers (exact: int8 and E4M3 values are fp16 / bf16 values); the K
scale folds into the score scale and the V scale into the output, so the loop does no extra multiply.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_LOG2E = 1.4426950408889634
REDUCE = os.environ.get("EF_ATTN_REDUCE") == "1"  # decided once, at import; the attention entry passes it


@triton.jit
def _rotated(base, mask, d, last, COS, SIN, ROT: tl.constexpr):
    """The rows at base + d (a (rows, 1) or scalar pointer base) rotated at position `last`: HF half-split order
    over the first ROT dims (the module doc's arithmetic), in the pointer's dtype; as loaded when ROT is 0."""
    x = tl.load(base + d[None, :], mask=mask, other=0.0)
    if ROT > 0:
        HALF: tl.constexpr = ROT // 2
        inrot = d < ROT
        partner = tl.where(d < HALF, d + HALF, tl.where(inrot, d - HALF, d))
        x2 = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + last.to(tl.int64) * ROT + d, mask=inrot, other=1.0).to(base.dtype.element_ty)
        s = tl.load(SIN + last.to(tl.int64) * ROT + d, mask=inrot, other=0.0).to(base.dtype.element_ty)
        s = tl.where(d < HALF, -s.to(tl.float32), s.to(tl.float32))
        x = (x.to(tl.float32) * c.to(tl.float32)[None, :] + x2 * s[None, :]).to(base.dtype.element_ty)
    return x


@triton.jit
def _stored(x, scale, KV_QUANT: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr, DT):
    """x as the cache of dtype DT stores it (runtime/kv_cache.py KVFormat.quantize): x / scale clamped to
    +-QMAX (rounded half to even first for int8: clamping first is the same, and the 1.5 * 2**23 shift rounds
    exactly below 2**22), converted."""
    if KV_QUANT:
        y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -QMAX), QMAX)
        if ROUND:
            y = (y + 12582912.0) - 12582912.0
        return y.to(DT)
    return x.to(DT)


@triton.jit
def _split_kernel(Q, K, V, POS, SLOPES, KV_SCALE, COS, SIN, O_PART, LSE_PART, OUT, LOCKS, KN, VN,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  stride_ob, stride_oh, stride_knb, stride_knh, stride_vnb, stride_vnh, k_off, v_off, qk_scale, SPLITS,
                  NH: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, KV_QUANT: tl.constexpr,
                  IEEE: tl.constexpr, DIRECT: tl.constexpr, ROT: tl.constexpr, REDUCE: tl.constexpr,
                  WRITE: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr, ONE_KV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # b * stride_kb can pass 2**31
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    last = tl.load(POS + b).to(tl.int32)  # attend to 0..last
    L = last + 1
    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HD)
    n = tl.arange(0, BLOCK_N)
    heads = kvh * G + g  # (BLOCK_G,) rows past G are padding for tl.dot's 16-row minimum
    gmask = g < G
    q = _rotated(Q + b * stride_qb + heads[:, None] * stride_qh, gmask[:, None], d, last, COS, SIN, ROT)
    scale2 = tl.cast(qk_scale, tl.float32)  # Inductor may pass a Python float as fp64: keep the loop in fp32
    k_scale = 1.0
    v_scale = 1.0
    if KV_QUANT:  # compute in the queries' dtype; K = s_k k, V = s_v v
        k_scale = tl.load(KV_SCALE).to(tl.float32)
        v_scale = tl.load(KV_SCALE + 1).to(tl.float32)
        scale2 = scale2 * k_scale
    else:
        q = q.to(K.dtype.element_ty)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HD], tl.float32)
    k_base = K + k_off + b * stride_kb + kvh * stride_kh  # (the offsets: a layer's whole cache as K)
    if ONE_KV:  # V is in K's tensor (the layer's cache): V itself is not read
        v_base = K + v_off + b * stride_vb + kvh * stride_vh
    else:
        v_base = V + v_off + b * stride_vb + kvh * stride_vh
    if WRITE:  # this step's k (rotated here, as q) and v, as stored: the block holding `last` takes them from
        # registers, and the split holding it stores them after its loop (no store-then-load ordering in the kernel)
        k_new = _stored(_rotated(KN + b * stride_knb + kvh * stride_knh, True, d, last, COS, SIN, ROT), k_scale,
                        KV_QUANT, QMAX, ROUND, K.dtype.element_ty)  # (1, HD)
        v_new = _stored(tl.load(VN + b * stride_vnb + kvh * stride_vnh + d[None, :]), v_scale, KV_QUANT, QMAX,
                        ROUND, K.dtype.element_ty)  # (the caches' dtype: with ONE_KV, V is not the cache)
    for s0 in range(start, end, BLOCK_N):
        offs = s0 + n
        nmask = offs < end
        k = tl.load(k_base + offs[:, None] * stride_ks + d[None, :], mask=nmask[:, None], other=0.0)
        if WRITE:
            k = tl.where((offs == last)[:, None], k_new, k)
        if KV_QUANT:
            k = k.to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * scale2  # (BLOCK_G, BLOCK_N), log2 units
        if HAS_ALIBI:
            qk += slope[:, None] * (offs - last).to(tl.float32)[None, :]
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * stride_vs + d[None, :], mask=nmask[:, None], other=0.0)
        if WRITE:
            v = tl.where((offs == last)[:, None], v_new, v)
        if KV_QUANT:
            v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    if WRITE:
        if (start <= last) & (last < end):
            tl.store(k_base + last * stride_ks + d[None, :], k_new)
            tl.store(v_base + last * stride_vs + d[None, :], v_new)
    nonempty = l > 0  # a chunk past L has no positions: weight 0 in the combine, no 0/0
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    if KV_QUANT:
        o = o * v_scale
    if DIRECT:
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:
        row = (b * NH + heads) * SPLITS + split  # partials are (B, nh, SPLITS[, HD]), contiguous
        tl.store(O_PART + row[:, None] * HD + d[None, :], o, mask=gmask[:, None])
        tl.store(LSE_PART + row, tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf")),
                 mask=gmask)
        if REDUCE:  # the last of the (b, kvh) programs to arrive combines its G heads' splits
            tl.debug_barrier()  # every thread's partials stored before the release below
            if tl.atomic_add(LOCKS + b * tl.num_programs(1) + kvh, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                _combine_rows(O_PART, LSE_PART, OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                              (b * NH + heads) * SPLITS, gmask, SPLITS, HD)


@triton.jit
def _combine_rows(O_PART, LSE_PART, out_ptrs, base, rmask, SPLITS, HD: tl.constexpr):
    """REDUCE's stage 2 for a few rows (a KV head's query heads): partials base + 0 .. SPLITS-1 of each row
    (from L2, .cg: other programs wrote them), weighted by exp2(lse - max), added in split order."""
    d = tl.arange(0, HD)
    mx = tl.full(base.shape, float("-inf"), tl.float32)
    for t in range(SPLITS):
        mx = tl.maximum(mx, tl.load(LSE_PART + base + t, mask=rmask, other=float("-inf"), cache_modifier=".cg"))
    mx = tl.where(rmask, mx, 0.0)  # split 0 is never empty: finite on every real row
    total = tl.zeros(base.shape, tl.float32)
    out = tl.zeros([base.shape[0], HD], tl.float32)
    for t in range(SPLITS):
        w = tl.exp2(tl.load(LSE_PART + base + t, mask=rmask, other=float("-inf"), cache_modifier=".cg") - mx)
        out += tl.load(O_PART + (base + t)[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0,
                       cache_modifier=".cg") * w[:, None]
        total += w
    out = out / tl.where(rmask, total, 1.0)[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _combine_kernel(O_PART, LSE_PART, OUT, stride_ob, stride_oh, SPLITS,
                    NH: tl.constexpr, HD: tl.constexpr, SPLITS_P2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HD)
    smask = s < SPLITS
    row = (b * NH + h) * SPLITS + s
    lse = tl.load(LSE_PART + row, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    o = tl.load(O_PART + row[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_config(B: int, nh: int, nkv: int, S: int, hd: int, device: torch.device) -> dict:
    """Launch shape from static sizes only (the same launch every step)."""
    block_n = 64 if hd <= 128 else 32
    # about two programs per multiprocessor, never more splits than blocks in S. Measured on an H200
    # (runtime.bench_attention --sweep, 7B shapes): within 1% of the best of 36 launch shapes at batch
    # 1 and 64, live 384 and 2300; 4 waves (17 splits at batch 1) were 10-15% slower.
    splits = max(1, min(2 * _sm_count(device) // (B * nkv), triton.cdiv(S, block_n), 64))
    return {"block_n": block_n, "splits": splits, "num_warps": 4, "num_stages": 3}


def launch(q, k_cache, v_cache, pos, scale: float, alibi_slopes=None, kv_scale=None, rope=None, *, block_n: int,
           splits: int, num_warps: int = 4, num_stages: int = 2, reduce: bool = False, new_kv=None,
           kv_format: tuple[float, bool] | None = None, kv: torch.Tensor | None = None,
           first: int = 0) -> torch.Tensor:
    """Both stages with an explicit launch shape (the custom op's default_config; the benchmark sweeps it);
    reduce: the splits combined by each (b, KV head)'s last program, no stage-2 kernel (module docstring).
    kv_scale: [s_k, s_v] (2,) fp32 of an int8 / fp8 cache, None for a cache in a float dtype.
    rope: (cos, sin) tables (positions, rotary_dim) fp32, contiguous: q comes unrotated and is rotated here.
    new_kv: (k, v) (B, nkv, hd) of this step, k unrotated where rope is given: written into the caches at pos
    (quantized as kv_format = (qmax, round) says, with kv_scale) by the kernel that reads them.
    kv: the layer's cache (2, slots, nkv, S, hd) given whole, k_cache / v_cache its views at slots first..: the
    kernel gets kv itself, once, and offsets, so that what it writes is the op's mutated argument, not views of it,
    and no argument twice (torch.compile's reinplacing clones the second of two arguments that share a tensor: a
    copy of the whole cache a layer, 8.6 ms a 7B batch-1 step on an H100 on 2026-12-07)."""
    B, nh, hd = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    G = nh // nkv
    assert nh == G * nkv and k_cache.shape == v_cache.shape and k_cache.shape[0] >= B and k_cache.shape[3] == hd
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    out = torch.empty((B, nh, hd), dtype=q.dtype, device=q.device)
    direct = splits == 1
    part_o = torch.empty((B, nh, splits, hd) if not direct else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, nh, splits) if not direct else (1,), dtype=torch.float32, device=q.device)
    slopes = alibi_slopes if alibi_slopes is not None else pos  # an unread pointer when HAS_ALIBI is False
    quant = kv_scale is not None
    assert quant or k_cache.dtype.is_floating_point and k_cache.dtype.itemsize > 1, "an 8-bit cache needs kv_scale"
    cos, sin = rope if rope is not None else (pos, pos)  # unread when ROT is 0
    reduce = reduce and not direct
    # a counter a (b, KV head), zeros, with reduce only (never read otherwise: pos stands in)
    locks = torch.zeros(B * nkv, dtype=torch.int32, device=q.device) if reduce else pos
    assert rope is None or (cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape
                            and cos.shape[1] % 2 == 0 and cos.shape[1] <= hd)
    k_new, v_new = new_kv if new_kv is not None else (q, q)  # unread without new_kv
    assert new_kv is None or (k_new.shape == v_new.shape == (B, nkv, hd) and k_new.stride(2) == 1
                              and v_new.stride(2) == 1 and k_new.dtype == q.dtype and (kv_format is not None) == quant)
    qmax, rounds = kv_format or (0.0, False)
    k_ptr, v_ptr, k_off, v_off = k_cache, v_cache, 0, 0
    if kv is not None:
        k_ptr, v_ptr, k_off, v_off = kv, q, first * kv.stride(1), kv.stride(0) + first * kv.stride(1)
    wrap_triton(_split_kernel)[(B, nkv, splits)](
        q, k_ptr, v_ptr, pos, slopes, kv_scale if quant else pos, cos, sin, part_o, part_lse, out, locks,
        k_new, v_new,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), k_off, v_off, scale * _LOG2E, splits,
        NH=nh, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HD=hd, BLOCK_N=block_n,
        HAS_ALIBI=alibi_slopes is not None, KV_QUANT=quant,
        IEEE=(q.dtype if quant else k_cache.dtype) == torch.float32, DIRECT=direct,
        ROT=cos.shape[1] if rope is not None else 0, REDUCE=reduce, WRITE=new_kv is not None, QMAX=qmax,
        ROUND=rounds, ONE_KV=kv is not None, num_warps=num_warps, num_stages=num_stages)
    if not direct and not reduce:
        wrap_triton(_combine_kernel)[(B, nh)](
            part_o, part_lse, out, out.stride(0), out.stride(1), splits,
            NH=nh, HD=hd, SPLITS_P2=triton.next_power_of_2(splits), num_warps=4)
    return out


@triton_op("engine_factory::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, alibi_slopes: torch.Tensor | None,
                     kv_scale: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
                     rope_sin: torch.Tensor | None = None, reduce: bool = False) -> torch.Tensor:
    """q (B, nh, hd), caches (>=B, nkv, S, hd) as stored, pos (B,) int64 -> (B, nh, hd) in q's dtype;
    kv_scale [s_k, s_v] for an int8 / fp8 cache; rope_cos / rope_sin: the rotary tables (positions,
    rotary_dim) fp32 when q comes unrotated (rotated here at pos, one kernel fewer a layer); reduce: the splits
    combined in the split kernel (the module docstring; the entry passes $EF_ATTN_REDUCE).

    A triton_op: torch.compile(fullgraph=True) traces into both kernels, and CUDA graphs capture them.
    """
    B, nh, hd = q.shape
    cfg = default_config(B, nh, k_cache.shape[1], k_cache.shape[2], hd, q.device)
    rope = None if rope_cos is None else (rope_cos, rope_sin)
    return launch(q, k_cache, v_cache, pos, scale, alibi_slopes, kv_scale, rope, reduce=reduce, **cfg)


@triton_op("engine_factory::decode_attention_writing", mutates_args={"kv"})
def decode_attention_writing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, first: int,
                             pos: torch.Tensor, scale: float, alibi_slopes: torch.Tensor | None,
                             kv_scale: torch.Tensor | None = None, kv_qmax: float = 0.0, kv_round: bool = False,
                             rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None,
                             reduce: bool = False) -> torch.Tensor:
    """decode_attention that also writes this step's k, v (B, nkv, hd) into the layer's cache kv (2, slots,
    nkv, S, hd) at slots first..first+B-1, positions pos: k unrotated where the rotary tables are given (rotated
    as q), both stored as the cache's format says (kv_qmax, kv_round: runtime/kv_cache.py's qmax and round;
    kv_scale its scales). One kernel fewer a layer than writing them before the call. The cache is declared
    mutated, so torch.compile writes it in place (tests/test_prefill.py checks the generated code on CUDA)."""
    B, nh, hd = q.shape
    kc, vc = kv[0, first:first + B], kv[1, first:first + B]
    cfg = default_config(B, nh, kc.shape[1], kc.shape[2], hd, q.device)
    rope = None if rope_cos is None else (rope_cos, rope_sin)
    fmt = (kv_qmax, kv_round) if kv_scale is not None else None
    return launch(q, kc, vc, pos, scale, alibi_slopes, kv_scale, rope, reduce=reduce, new_kv=(k, v), kv_format=fmt,
                  kv=kv, first=first, **cfg)
