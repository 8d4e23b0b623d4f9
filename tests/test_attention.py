"""Decode attention entries (runtime/attention.py) against a plain float64 softmax written here.

The Triton kernel runs on the GPU (marker cuda, through the device tool) and, where the triton
package is installed, on CPU through Triton's interpreter (TRITON_INTERPRET=1; no bf16 there: the
interpreter stores bf16 as integers and its tl.dot does not convert them). Without triton these skip.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import DECODERS, random_decoder
from runtime.attention import DECODE_ATTENTION, decode_attention, select_decode_attention
from runtime.errors import UserError
from runtime.kv_cache import KV_FORMATS
from runtime.model import Decoder, alibi_slopes

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # max abs error; outputs are O(1)

# (B, nh, nkv, S, hd, alibi): MHA, GQA 4 and 8, MQA, ALiBi, head dims 16..128, S not a multiple of blocks
CASES = {
    "b1_mha": (1, 4, 4, 40, 32, False),
    "b3_gqa4": (3, 8, 2, 100, 16, False),
    "b2_gqa8_alibi": (2, 16, 2, 75, 64, True),
    "b5_mqa": (5, 8, 1, 130, 16, False),
    "b8_mha_alibi": (8, 4, 4, 33, 128, True),
    "b4_gqa4_hd128": (4, 8, 2, 257, 128, False),
}


def reference(q, k_cache, v_cache, pos, scale, slopes):
    """float64 softmax over j = 0..pos[b] of scale q.k + slope (j - pos); KV head h // G for head h."""
    B, nh, _ = q.shape
    G, S = nh // k_cache.shape[1], k_cache.shape[2]
    k = k_cache[:B].double().repeat_interleave(G, dim=1)  # (B, nh, S, hd)
    v = v_cache[:B].double().repeat_interleave(G, dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.double(), k) * scale
    j = torch.arange(S, device=q.device)
    if slopes is not None:
        s = s + slopes.double()[None, :, None] * (j[None, None, :] - pos[:, None, None])
    s = s.masked_fill(j[None, None, :] > pos[:, None, None], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


def make_inputs(case, dtype, seed, poison=True, spare_rows=1):
    """Random q and caches (with spare_rows unused cache rows, as the decoder's max_batch cache has),
    positions 0..S-1 different per row, including 0 and S-1, and the reference output. With poison,
    cache entries past pos hold NaN, which a kernel that reads past the live length would spread."""
    B, nh, nkv, S, hd, alibi = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, hd, generator=g)
    k = torch.randn(B + spare_rows, nkv, S, hd, generator=g)
    v = torch.randn(B + spare_rows, nkv, S, hd, generator=g)
    pos = torch.randint(0, S, (B,), generator=g)
    pos[0] = S - 1
    if B > 1:
        pos[1] = 0
    slopes = alibi_slopes(nh) if alibi else None
    ref = reference(q.to(dtype), k.to(dtype), v.to(dtype), pos, hd ** -0.5, slopes)
    dead = torch.arange(S)[None, :] > pos[:, None] if poison else torch.zeros(B, S, dtype=torch.bool)
    k[:B][dead[:, None, :].expand(B, nkv, S)] = float("nan")
    v[:B][dead[:, None, :].expand(B, nkv, S)] = float("nan")
    put = lambda t: None if t is None else t.to(DEV)
    return (q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), pos.to(DEV), put(slopes)), ref


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


# ---- the torch entry (the reference the decoder has always computed) ------------------------------
@pytest.mark.parametrize("name", CASES)
def test_torch_entry_matches_plain_softmax(name, one_thread):
    (q, k, v, pos, slopes), ref = make_inputs(CASES[name], torch.float32, seed=1, poison=False)  # SDPA masks
    B = q.shape[0]
    assert_close(decode_attention(q, k[:B], v[:B], pos, alibi_slopes=slopes, impl="torch"), ref, torch.float32)


# ---- the triton entry --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; on CPU it runs interpreted)")
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")  # read as triton is imported and the kernels decorated
        import runtime.attention_triton as kernels
        yield kernels


DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="no bf16 dot in Triton's interpreter"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_triton_op_matches_reference(kernels, name, dtype, one_thread):
    (q, k, v, pos, slopes), ref = make_inputs(CASES[name], dtype, seed=2)
    assert_close(kernels.decode_attention(q, k, v, pos, q.shape[-1] ** -0.5, slopes), ref, dtype)


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("splits,block_n", [(1, 16), (3, 16), (7, 32), (64, 16)])
def test_triton_any_split_count(kernels, splits, block_n, reduce, one_thread):
    """Direct (one split) and combined outputs alike, also with more splits than live blocks (empty ones); the
    splits combined by a second kernel or by each KV head's last program (reduce: no NaN from the poisoned cache
    or the empty splits, rows of every batch entry and head written)."""
    (q, k, v, pos, slopes), ref = make_inputs(CASES["b2_gqa8_alibi"], torch.float32, seed=3)
    out = kernels.launch(q, k, v, pos, q.shape[-1] ** -0.5, slopes, splits=splits, block_n=block_n, reduce=reduce)
    assert_close(out, ref, torch.float32)


def test_in_kernel_combine_is_an_environment_switch_the_entry_passes_to_the_op(kernels, monkeypatch, one_thread):
    """$EF_ATTN_REDUCE=1, read once at import, makes the triton entry ask the op for the in-kernel combine; the
    switch is an argument of the op (so in the traced graph and the compile cache's key, not read inside it)."""
    import os
    import subprocess
    import sys

    probe = "import runtime.attention_triton as a; print(a.REDUCE)"
    for value, want in (("1", "True"), (None, "False")):
        env = {k: v for k, v in os.environ.items() if k != "EF_ATTN_REDUCE"}
        if value:
            env["EF_ATTN_REDUCE"] = value
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
    case = (1, 8, 1, 130, 16, False)  # MQA at batch 1: more than one split on any device
    (q, k, v, pos, _), ref = make_inputs(case, torch.float32, seed=9)
    seen, launch = [], kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda *a, **kw: seen.append(kw) or launch(*a, **kw))
    for flag in (True, False):
        monkeypatch.setattr(kernels, "REDUCE", flag)
        assert_close(DECODE_ATTENTION["triton"].attend(q, k, v, pos, None, case[4] ** -0.5), ref, torch.float32)
        assert seen[-1]["reduce"] is flag and seen[-1]["splits"] > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_in_kernel_combine_equals_the_combine_kernel(kernels, dtype, one_thread):
    """reduce=True ($EF_ATTN_REDUCE=1) against the two-kernel form on every case: the same weights, added in
    the same split order, so within a few ulps of each other (not bit-equal: tl.sum's tree against a loop)."""
    for name, case in CASES.items():
        (q, k, v, pos, slopes), _ = make_inputs(case, dtype, seed=8)
        cfg = dict(splits=5, block_n=16)
        a = kernels.launch(q, k, v, pos, case[4] ** -0.5, slopes, **cfg)
        b = kernels.launch(q, k, v, pos, case[4] ** -0.5, slopes, reduce=True, **cfg)
        assert not b.isnan().any(), name
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 1e-3}
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")
        if CUDA:  # programs race to be last there: the bits must not depend on which one is
            runs = [kernels.launch(q, k, v, pos, case[4] ** -0.5, slopes, reduce=True, **cfg) for _ in range(10)]
            assert all(torch.equal(r, b) for r in runs), name


def test_triton_scale_and_activation_dtype(kernels, one_thread):
    """A non-default scale, and fp32 queries against an fp16 cache: output in the queries' dtype."""
    (q, k, v, pos, _), _ = make_inputs(CASES["b3_gqa4"], torch.float16, seed=4, poison=False)
    q = q.float() + 1e-3 * torch.randn_like(q, dtype=torch.float32)  # not representable in fp16
    ref = reference(q.half().cpu(), k.cpu(), v.cpu(), pos.cpu(), 0.3, None)  # the kernel reads q as the cache's dtype
    out = DECODE_ATTENTION["triton"].attend(q, k, v, pos, None, 0.3)
    assert out.dtype == torch.float32
    assert (out.double().cpu() - ref).abs().max().item() <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim", [16, 8])  # the whole head, and GPT-NeoX-style partial rotary
def test_triton_rotates_unrotated_queries(kernels, dtype, rotary_dim, one_thread):
    """Given the rotary tables, the entry rotates q at pos[b] itself (HF's rotate_half over the first
    rotary_dim dims, the rest untouched): as attending with q rotated beforehand in float64."""
    case = CASES["b3_gqa4"]  # head_dim 16
    (q, k, v, pos, _), _ = make_inputs(case, dtype, seed=6)
    g = torch.Generator().manual_seed(6)
    angles = torch.rand(case[3], rotary_dim // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    qd, c, s = q.double().cpu(), cos[pos.cpu()][:, None, :], sin[pos.cpu()][:, None, :]
    half = rotary_dim // 2
    rot = torch.cat([-qd[..., half:rotary_dim], qd[..., :half]], -1)
    q_rot = torch.cat([qd[..., :rotary_dim] * c + rot * s, qd[..., rotary_dim:]], -1)
    ref = reference(q_rot, k.double().cpu().nan_to_num(), v.double().cpu().nan_to_num(), pos.cpu(), 0.25, None)
    rope = (cos.float().to(DEV), sin.float().to(DEV))
    out = DECODE_ATTENTION["triton"].attend(q, k, v, pos, None, 0.25, rope=rope)
    assert_close(out, ref, dtype)
    assert DECODE_ATTENTION["triton"].rotates_q and not DECODE_ATTENTION["torch"].rotates_q


def _rotated_like_the_kernel(x, pos, cos, sin):
    """x (B, n, hd) rotated at pos (B,) over the tables' first rotary_dim dims as the module doc says (cos / sin
    rounded to x's dtype, the products and the sum in fp32, rounded once): the bits the kernel stores."""
    rd, half = cos.shape[1], cos.shape[1] // 2
    c, s = (t[pos].to(x.dtype).float()[:, None, :] for t in (cos, sin))
    xr = x[..., :rd].float()
    out = x.clone()
    out[..., :rd] = (xr * c + torch.cat([-xr[..., half:], xr[..., :half]], -1) * s).to(x.dtype)
    return out


@pytest.mark.parametrize("fmt", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("rotary_dim,alibi", [(16, False), (8, False), (0, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_writes_this_steps_kv_and_attends_to_it(kernels, dtype, rotary_dim, alibi, fmt, one_thread):
    """attend_writing ($EF_KV_IN_ATTENTION=1): this step's k (rotated at pos as q is) and v land in the cache
    at slots first.., positions pos, in the cache's format (KVFormat.quantize of what the decoder would write),
    nothing else of the cache changes, and the output is the torch entry's over the cache so written. The old
    cache value at pos is poison (NaN, or the format's largest level), so attending to it instead of this step's
    k / v shows."""
    if fmt == "fp8" and not CUDA:  # (triton 3.9.0's interpreter: 124.0 -> 64, 68 -> 72; torch and the GPU: 128, 64)
        pytest.skip("Triton's interpreter rounds fp32 -> float8e4nv wrongly; the GPU run checks fp8")
    B, nh, nkv, S, hd = 3, 8, 2, 70, 16
    f = KV_FORMATS[fmt]
    g = torch.Generator().manual_seed(11)
    q, k_new, v_new = (torch.randn(B, n, hd, generator=g) for n in (nh, nkv, nkv))
    k_new = 4 * k_new
    pos, first = torch.tensor([S - 1, 0, 33]), 1
    kv = torch.randn(2, B + 2, nkv, S, hd, generator=g)
    sc = f.scales(4.5 * 4, 4.5) if f.scaled else None
    store = f.storage_dtype(dtype)
    kv = torch.stack([f.quantize(kv[0] * 4, sc[0], store), f.quantize(kv[1], sc[1], store)]) if f.scaled \
        else kv.to(dtype)
    for b in range(B):  # poison at and past pos: the kernel must use this step's k / v at pos, and never read past it
        kv[:, first + b, :, pos[b]:] = float("nan") if not f.scaled else torch.tensor(f.qmax).to(store)
    angles = torch.rand(S, max(rotary_dim, 2) // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = (torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float())
    q, k_new, v_new = q.to(dtype), k_new.to(dtype), v_new.to(dtype)
    rope = (cos.to(DEV), sin.to(DEV)) if rotary_dim else None
    k_rot = _rotated_like_the_kernel(k_new, pos, cos, sin) if rotary_dim else k_new
    q_rot = _rotated_like_the_kernel(q, pos, cos, sin) if rotary_dim else q
    want_kv = kv.clone()
    rows = first + torch.arange(B)
    want_kv[0, rows, :, pos] = f.quantize(k_rot, None if sc is None else sc[0], store)
    want_kv[1, rows, :, pos] = f.quantize(v_new, None if sc is None else sc[1], store)
    slopes = alibi_slopes(nh) if alibi else None
    clean = want_kv.float().nan_to_num().to(store)  # (past pos: masked either way; SDPA's 0 * NaN would not be)
    want = decode_attention(q_rot, clean[0, rows], clean[1, rows], pos, alibi_slopes=slopes, impl="torch",
                            kv_scale=sc)
    put = lambda t: None if t is None else t.to(DEV)
    got_kv = kv.to(DEV)
    out = DECODE_ATTENTION["triton"].attend_writing(put(q), put(k_new), put(v_new), got_kv, first, put(pos),
                                                    put(slopes), None, kv_scale=put(sc), kv_format=f, rope=rope)
    got_kv = got_kv.cpu()
    written = torch.zeros(kv.shape[1:4], dtype=torch.bool)
    written[rows, :, pos] = True
    assert torch.equal(got_kv[:, ~written].float().nan_to_num(7.0), want_kv[:, ~written].float().nan_to_num(7.0))
    new, ref_new = got_kv[:, written].float(), want_kv[:, written].float()
    if DEV.type == "cpu":  # the interpreter: the same fp32 arithmetic, bit for bit
        assert torch.equal(new, ref_new)
    else:  # the GPU may contract to FMAs: a level of int8, a rounding of fp8 / the activation dtype
        step = 1.0 if fmt == "int8" else 0.0
        assert ((new - ref_new).abs() <= step + 2 ** -3 * ref_new.abs() + 1e-6).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-3 if dtype == torch.float16 else 2e-2
    assert (out.float().cpu() - want.float()).abs().max().item() <= tol * (4 if f.scaled else 1)


@pytest.mark.parametrize("fmt", ["auto", "int8"])
@pytest.mark.parametrize("splits,reduce", [(3, False), (5, False), (3, True), (1, False)])
def test_triton_writing_equals_writing_first_at_any_split_count(kernels, splits, reduce, fmt, one_thread):
    """The launch shapes a GPU takes (several splits a sequence, blocks of 16, the in-kernel combine), which the
    entry's default_config never picks at the interpreter's sizes: attending while writing this step's k / v gives
    the output and the cache, bit for bit, of writing them first (as the kernel stores them) and attending after."""
    B, nh, nkv, S, hd, first = 4, 8, 2, 80, 16, 2
    f = KV_FORMATS[fmt]
    g = torch.Generator().manual_seed(5)
    q, k_new, v_new = (torch.randn(B, n, hd, generator=g) for n in (nh, nkv, nkv))
    pos = torch.tensor([15, 16, S - 1, 0])  # block edges, the last position, the first
    sc = f.scales(4.0, 4.0) if f.scaled else None
    store = f.storage_dtype(torch.float32)
    raw = torch.randn(2, B + 3, nkv, S, hd, generator=g)
    kv = torch.stack([f.quantize(raw[0], sc[0], store), f.quantize(raw[1], sc[1], store)]) if f.scaled else raw
    angles = torch.rand(S, hd // 2, generator=g, dtype=torch.float64) * 6.3
    rope = (torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float())
    cfg = {"block_n": 16, "splits": splits, "reduce": reduce}
    fmt_args = {"kv_format": (f.qmax, f.round)} if f.scaled else {}
    written = kv.clone()
    rows = first + torch.arange(B)
    written[0, rows, :, pos] = f.quantize(_rotated_like_the_kernel(k_new, pos, *rope), None if sc is None else sc[0],
                                          store)
    written[1, rows, :, pos] = f.quantize(v_new, None if sc is None else sc[1], store)
    want = kernels.launch(q, written[0, first:first + B], written[1, first:first + B], pos, 0.25, None, sc, rope, **cfg)
    got_kv = kv.clone()
    got = kernels.launch(q, got_kv[0, first:first + B], got_kv[1, first:first + B], pos, 0.25, None, sc, rope,
                         new_kv=(k_new, v_new), kv=got_kv, first=first, **cfg, **fmt_args)
    assert torch.equal(got_kv, written)
    assert torch.equal(got, want)


# ---- selection ----------------------------------------------------------------------------------
def test_selection_is_a_setting_with_one_line_errors(monkeypatch):
    monkeypatch.delenv("EF_DECODE_ATTENTION", raising=False)
    assert select_decode_attention(torch.device("cpu"), 64).name == "sliced"  # auto on CPU: live positions
    assert select_decode_attention(torch.device("cuda"), 80).name == "torch"  # no kernel for head_dim 80
    monkeypatch.setenv("EF_DECODE_ATTENTION", "torch")
    assert select_decode_attention(torch.device("cuda"), 128).name == "torch"
    monkeypatch.setenv("EF_DECODE_ATTENTION", "flash9")
    with pytest.raises(UserError, match="decode attention 'flash9'.*unknown; use auto or one of torch, triton, sliced"):
        select_decode_attention(torch.device("cpu"), 64)
    with pytest.raises(UserError, match="'triton' cannot run here: .*(not installed|not a power of two)"):
        select_decode_attention(DEV, 80, name="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run via the device tool)")
def test_triton_compiles_fullgraph_and_replays_in_a_cuda_graph(kernels):
    """One capture, then replays with other positions: the grid is static, the live length is read on the GPU."""
    case = CASES["b4_gqa4_hd128"]
    (q, k, v, pos, slopes), _ = make_inputs(case, torch.bfloat16, seed=5, poison=False)
    step = torch.compile(lambda q, pos: DECODE_ATTENTION["triton"].attend(q, k, v, pos, None), fullgraph=True)
    static_q, static_pos = q.clone(), pos.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static_q, static_pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static_q, static_pos)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        static_q.copy_(torch.randn(q.shape, generator=g).to(q))
        static_pos.copy_(torch.randint(0, case[3], pos.shape, generator=g).to(pos))
        graph.replay()
        ref = reference(static_q.cpu(), k.cpu(), v.cpu(), static_pos.cpu(), q.shape[-1] ** -0.5, None)
        assert_close(out, ref, torch.bfloat16)


# ---- in the decoder --------------------------------------------------------------------------------
def _decoder(kind: str, dtype, name: str) -> Decoder:
    """A 2-layer decoder with random weights (helpers.random_decoder), decode attention entry `name`."""
    d = random_decoder(kind, dtype, DEV)
    d.decode_attention = DECODE_ATTENTION[name]
    return d


@pytest.mark.parametrize("kv_write", ["decoder", "attention"])  # $EF_KV_IN_ATTENTION unset / 1
@pytest.mark.parametrize("q_rotary", ["in_attention", "in_decoder"])  # $EF_ROPE_IN_ATTENTION unset / 0
@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_decode_with_triton_equals_torch(kernels, kind, q_rotary, kv_write, one_thread):
    """Prompts of different lengths, then decode steps: the same logits through either entry, and the same
    cache after them. On CUDA the triton decoder's step is torch.compile'd (fullgraph) and captured in a CUDA
    graph, as Engine.compile() does."""
    dtype = torch.float16 if CUDA else torch.float32
    ref, fast = _decoder(kind, dtype, "torch"), _decoder(kind, dtype, "triton")
    fast.rope_in_attention = q_rotary == "in_attention"
    fast.kv_in_attention = kv_write == "attention"
    lengths = [3, 9, 1]
    prompts = torch.randint(0, 97, (sum(lengths),), generator=torch.Generator().manual_seed(8)).to(DEV)
    tok = ref.prefill(prompts, lengths).argmax(-1)
    fast.prefill(prompts, lengths)
    step = fast.decode
    if CUDA:
        from runtime.engine import _DecodeGraph

        step = _DecodeGraph(fast, len(lengths), torch.compile(fast.decode, dynamic=False, fullgraph=True))
    pos = torch.tensor(lengths, device=DEV)
    for _ in range(4):
        want = ref.decode(tok, pos)
        got = step(tok, pos)
        tol = 1e-4 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
        assert (got - want).abs().max().item() <= tol
        tok, pos = want.argmax(-1), pos + 1
    for mine, theirs in zip(fast.kv_cache, ref.kv_cache):
        assert (mine.float() - theirs.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter rounds fp32 -> float8e4nv wrongly"))])
def test_decoder_writing_a_quantized_cache_in_attention_equals_the_decoders_write(kernels, fmt, one_thread):
    """$EF_KV_IN_ATTENTION=1 over an 8-bit cache (the decoder passes its format and each layer's scales): decode
    logits and the cache after them as with the decoder's own write, the same triton entry otherwise."""
    from helpers import random_decoder_tensors
    from runtime.kv_cache import SCALE_NAME

    dtype = torch.float16 if CUDA else torch.float32
    spec, tensors = random_decoder_tensors("rope_gqa", dtype, DEV)
    for i in range(spec.num_layers):
        tensors[SCALE_NAME.format(i=i)] = KV_FORMATS[fmt].scales(2.0, 1.0).to(DEV)
    decs = []
    for writes in (False, True):
        d = Decoder(spec, dict(tensors), kv_cache=fmt)
        d.allocate_cache(4, 40)
        d.decode_attention, d.kv_in_attention = DECODE_ATTENTION["triton"], writes
        decs.append(d)
    lengths = [3, 9, 1]
    prompts = torch.randint(0, 97, (sum(lengths),), generator=torch.Generator().manual_seed(8)).to(DEV)
    tok = decs[0].prefill(prompts, lengths).argmax(-1)
    decs[1].prefill(prompts, lengths)
    pos = torch.tensor(lengths, device=DEV)
    for _ in range(4):
        want, got = (d.decode(tok, pos) for d in decs)
        assert (got - want).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item())
        tok, pos = want.argmax(-1), pos + 1
    for mine, theirs in zip(decs[1].kv_cache, decs[0].kv_cache):
        assert mine.dtype == theirs.dtype == KV_FORMATS[fmt].storage
        err = (mine.float() - theirs.float()).abs()  # CPU: the same bits; GPU: a level (a rounding of the divide)
        assert (err <= (0 if not CUDA else 1.0 + 2 ** -3 * theirs.float().abs())).all()


def test_split_gate_up_gives_the_fused_products(monkeypatch):
    """$EF_SPLIT_GATE_UP=1 (gate and up as two products over views of the stored rows, for A/B runs on the GPU):
    the decoder's prefill and decode logits as with the one fused product."""
    dtype = torch.float32
    fused = _decoder("rope_gqa", dtype, "torch")
    monkeypatch.setenv("EF_SPLIT_GATE_UP", "1")
    split = _decoder("rope_gqa", dtype, "torch")
    assert split.split_gate_up and not fused.split_gate_up  # (set only where every layer's up linear splits)
    lengths = [3, 9]
    prompts = torch.randint(0, 97, (sum(lengths),), generator=torch.Generator().manual_seed(3)).to(DEV)
    want, got = fused.prefill(prompts, lengths), split.prefill(prompts, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tok, pos = want.argmax(-1), torch.tensor(lengths, device=DEV)
    torch.testing.assert_close(split.decode(tok, pos), fused.decode(tok, pos), rtol=1e-5, atol=1e-5)
