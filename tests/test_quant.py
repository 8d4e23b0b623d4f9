"""Weight-only engines (precision=int8_wo, int4_wo, int4_wo_g128, int4_wo_g64, int4_wo_g32): what the rank file stores,
against the checkpoint's own weights, what the engine computes, against transformers in fp32, tp2 against
tp1, and the Triton kernel against the plain-torch reference (interpreted on CPU, on the GPU with cuda)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_factory.stages.validate import QUANT_BOUNDS
from helpers import build_in_process, hf_greedy, hf_logits, hf_model
from runtime import Engine
from runtime.quant import MODES

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_mha):
    """The MHA tiny LLaMA (biases, untied head) as int8_wo and as fp16 engines."""
    store = tmp_path_factory.mktemp("quant-store")
    return {p: build_in_process(tiny_llama_mha, store, f"precision={p}") for p in ("int8_wo", "fp16")}


def test_int8_per_channel_rounds_each_weight_to_its_nearest_level():
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    out = MODES["int8_wo"].quantize(w, torch.float16)
    q, scale = out["weight"], out["scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (48,)
    assert int(q.abs().max()) <= 127 and (q.abs().amax(dim=1) >= 126).all()  # each row uses its range
    err = (q.float() * scale.float()[:, None] - w).abs()
    assert (err <= scale.float()[:, None] * 0.5 + 1e-6).all()  # nearest level, per row


def test_int8_rows_of_zeros_or_tiny_values_stay_finite():
    w = torch.stack([torch.zeros(16), torch.full((16,), 1e-7), torch.linspace(-1, 1, 16)])
    out = MODES["int8_wo"].quantize(w, torch.float16)
    deq = out["weight"].float() * out["scale"].float()[:, None]
    assert (out["scale"] > 0).all() and torch.isfinite(deq).all()
    assert (deq - w).abs().max() <= out["scale"].float().max() * 0.5 + 1e-6


def test_rank_file_holds_int8_linears_that_dequantize_to_the_checkpoint(built, tiny_llama_mha):
    from safetensors.torch import load_file

    engine_dir = built["int8_wo"]
    meta = json.loads((engine_dir / "engine.json").read_text())
    assert meta["quant"]["mode"] == "int8_wo" and meta["dtype"] == "float16"
    src = load_file(str(next(tiny_llama_mha.glob("*.safetensors"))))
    with safe_open(str(engine_dir / "rank0.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("embed.weight").dtype == torch.float16
        for i in range(2):
            for lin in LINEARS:
                assert f.get_tensor(f"layers.{i}.{lin}.weight").dtype == torch.int8
                assert f.get_tensor(f"layers.{i}.{lin}.scale").dtype == torch.float16
            # q/k/v fused in the rank file: the first rows are q_proj's, from the HF checkpoint
            q = f.get_tensor(f"layers.{i}.attn.qkv.weight").float() * f.get_tensor(f"layers.{i}.attn.qkv.scale").float()[:, None]
            want = src[f"model.layers.{i}.self_attn.q_proj.weight"]
            step = f.get_tensor(f"layers.{i}.attn.qkv.scale").float()[:want.shape[0], None]
            assert ((q[:want.shape[0]] - want).abs() <= step * 0.5 + 1e-4).all()
    assert not any(n.endswith(".scale") for n in names if not any(f".{lin}." in n for lin in LINEARS))
    sizes = {p: (d / "rank0.safetensors").stat().st_size for p, d in built.items()}
    assert sizes["int8_wo"] < 0.8 * sizes["fp16"]


def test_int8_engine_matches_transformers_within_its_bounds(built, tiny_llama_mha):
    engine = Engine.load(built["int8_wo"], device="cpu")
    ref = hf_model(tiny_llama_mha)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.spec.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 8)]
    rel_bound, agree_bound = QUANT_BOUNDS["int8_wo"]
    agree = 0
    for ids in prompts:
        want = hf_logits(ref, ids)
        assert (engine.score(ids) - want).abs().max() / want.abs().max() <= rel_bound
        # teacher-forced, as validation counts it: our argmax along transformers' greedy path
        path = hf_greedy(ref, ids, 16)
        ours = engine.score(ids + path[:-1])[len(ids) - 1:].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(ours, path))
    assert agree / (16 * len(prompts)) >= agree_bound
    v = json.loads((built["int8_wo"] / "validation.json").read_text())["parity"]
    assert v["passed"] and 0 < v["max_rel_logits"] <= rel_bound  # the build's own validation agrees


def test_parity_fails_on_non_finite_logits(built):
    from types import SimpleNamespace

    from engine_factory.stages.validate import parity

    engine = Engine.load(built["fp16"], device="cpu")
    ref = hf_model_like_nan(engine)
    vc = SimpleNamespace(prompts=[], prompt_token_lengths=[3], max_new_tokens=2)
    p = parity(engine, ref, vc)
    assert p["max_abs_logits"] == float("inf")  # NaN must not compare as zero error


def hf_model_like_nan(engine):
    """A stand-in reference whose logits are NaN: what a broken (overflowing) engine looks like from the
    other side of the comparison."""
    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, past_key_values=None, use_cache=True):
            from types import SimpleNamespace

            n = input_ids.shape[1]
            return SimpleNamespace(logits=torch.full((1, n, engine.spec.vocab_size), float("nan")),
                                   past_key_values=None)
    return Ref()


def test_unknown_quant_mode_is_one_line(cli, store):
    rc, out, err = cli("precision.quant=int3_wo", f"store={store}", "model.source=dummy")
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: precision.quant=int3_wo is not one of fp8, int4_wo, int4_wo_g128, "
                                            "int4_wo_g32, int4_wo_g64, int8_wo, none, sq, sq_per_channel, sq_per_token, "
                                            "sq_per_token_per_channel")


# ---- INT4 weight-only (runtime/quant/int4_wo.py) and the weight-only Triton kernel ---------------------------
INT4 = ("int4_wo", "int4_wo_g128", "int4_wo_g64", "int4_wo_g32")
# the engine-level tests build each of these (g32 is g64's code with another group size: its unit tests above
# and SmolLM2's ROUGE in the README cover it, and CI time stays in bounds)
INT4_ENGINES = ("int4_wo", "int4_wo_g128", "int4_wo_g64")
# tiny dummies of each family whose linears' in_features (128, 256) every group size divides, also at tp2
FAMILIES = {
    "llama": "architectures:[LlamaForCausalLM],model_type:llama,hidden_size:128,intermediate_size:256,"
             "num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,vocab_size:300,max_position_embeddings:128",
    "gpt2": "architectures:[GPT2LMHeadModel],model_type:gpt2,n_embd:128,n_inner:256,n_layer:2,n_head:4,vocab_size:300,"
            "n_positions:128",
    "bloom": "architectures:[BloomForCausalLM],model_type:bloom,hidden_size:128,n_layer:2,n_head:4,vocab_size:300",
    "gpt_bigcode": "architectures:[GPTBigCodeForCausalLM],model_type:gpt_bigcode,n_embd:128,n_inner:256,n_layer:2,"
                   "n_head:4,multi_query:true,vocab_size:300,n_positions:128",
}


def _dummy(store, family: str, *overrides: str, wide: bool = False):
    from helpers import build_in_process

    config = FAMILIES[family]
    if wide:  # 256 inputs: attn.o at tp2 keeps 128 per rank, one g128 group
        config = config.replace("hidden_size:128", "hidden_size:256").replace("intermediate_size:256", "intermediate_size:512")
    return build_in_process("dummy", store, f"+model.config={{{config}}}", *overrides)


@pytest.mark.parametrize("mode", INT4)
def test_int4_levels_are_within_half_a_step(mode):
    w = torch.randn(24, 512) * torch.logspace(-3, 1, 24)[:, None]
    w[3] = 0
    w[5] = w[5].abs() + 0.5  # all positive: 0 is still a level
    out = MODES[mode].quantize(w, torch.float16)
    from runtime.quant.int4_wo import dequantize, unpack

    shapes = {k: (tuple(v.shape), v.dtype) for k, v in out.items()}
    assert shapes == {k: (s.shape, s.dtype) for k, s in MODES[mode].stored((24, 512), torch.float16).items()}
    assert int(unpack(out["weight"]).max()) <= 15 and int(out["zero"].max()) <= 15
    deq = dequantize(out["weight"], out["scale"], out["zero"], torch.float32)
    step = out["scale"].float().reshape(24, -1).repeat_interleave(512 // out["scale"].reshape(24, -1).shape[1], 1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6 * w.abs().max()).all()
    assert (deq[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", INT4)
def test_int4_cpu_weight_dequantized_once_gives_the_per_call_bits(mode, dtype):
    """The CPU reference dequantizes when the linear is made; its outputs are those of dequantizing per call
    (bit for bit), with and without a bias, and an input of another dtype still dequantizes per call."""
    import torch.nn.functional as F

    from runtime.quant import make_linear
    from runtime.quant.int4_wo import dequantize

    g = torch.Generator().manual_seed(0)
    stored = {f"l.{k}": v for k, v in MODES[mode].quantize(torch.randn(40, 256, generator=g), dtype).items()}
    bias = torch.randn(40, generator=g).to(dtype)
    for tensors, b, x_dtype in ((stored, None, dtype), ({**stored, "l.bias": bias}, bias, dtype),
                                (stored, None, torch.float64)):  # float64: not the cached dtype
        lin = make_linear(mode, tensors, "l")
        assert lin.kernel == "torch" and lin.dequantized is not None and lin.dequantized.dtype == dtype
        x = torch.randn(3, 7, 256, generator=g).to(x_dtype)
        per_call = F.linear(x, dequantize(stored["l.weight"], stored["l.scale"], stored["l.zero"], x_dtype), b)
        got = lin(x)
        assert got.dtype == x_dtype and torch.equal(got, per_call)


@pytest.fixture(scope="module")
def wo_kernel():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; on CPU it runs interpreted)")
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():
            mp.setenv("TRITON_INTERPRET", "1")  # read as triton is imported and the kernels decorated
        import runtime.quant.triton_wo as kernel
        yield kernel


def _kernel_vs_reference(kernel, mode, M, dtype, device, N=48, K=256, **cfg):
    """The kernel (default launch shape for M, or cfg: e.g. SPLIT_K, GEMV) against the torch reference."""
    from runtime.quant import make_linear

    g = torch.Generator().manual_seed(M)
    w = torch.randn(N, K, generator=g)
    stored = {f"l.{k}": v.to(device) for k, v in MODES[mode].quantize(w, dtype).items()}
    x = torch.randn(M, K, generator=g).to(device, dtype)
    ref_linear = make_linear(mode, {k: v.cpu() for k, v in stored.items()}, "l")
    ref_linear.kernel = "torch"
    want = ref_linear(x.cpu().float()).to(torch.float64)  # the oracle, in fp32
    bits = 8 if mode == "int8_wo" else 4
    if cfg:
        got = kernel.launch(x, stored["l.weight"], stored["l.scale"], stored.get("l.zero"), bits, **cfg)
    else:
        got = kernel.weight_only_linear(x, stored["l.weight"], stored["l.scale"], stored.get("l.zero"), bits)
    assert got.dtype == dtype and got.shape == (M, N)
    err = (got.cpu().double() - want).abs().max() / want.abs().max()
    assert err <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], err


def _dequantize_vs_reference(kernel, mode, dtype, device, N=40, K=320):
    """The one-pass dequantize of the prefill path gives the plain-torch dequantized weight, bit for bit."""
    from runtime.quant import int4_wo

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N))
    t = {k: v.to(device) for k, v in MODES[mode].quantize(w, dtype).items()}
    bits = 8 if mode == "int8_wo" else 4
    got = kernel.dequantize(t["weight"], t["scale"], t.get("zero"), bits).cpu()
    t = {k: v.cpu() for k, v in t.items()}
    want = (t["weight"].to(dtype) * t["scale"][:, None] if bits == 8
            else int4_wo.dequantize(t["weight"], t["scale"], t["zero"], dtype))
    assert got.dtype == dtype and torch.equal(got, want)


def _interpreted(code: str) -> None:
    """Run code (importing test_quant as t) in a fresh process through Triton's interpreter on CPU:
    TRITON_INTERPRET is read when triton is imported, and earlier tests of a session import it."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; on CPU it runs interpreted)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).parent), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_gemv_weight_tiles_read_nothing_past_k_or_n():
    """The GEMV's tile loader (triton_wo._gemv_tile) on its own, through Triton's interpreter: a tile past K
    (PREFETCH fetches one or two steps beyond a program's last) or partly past it reads zeros there; the kernel's
    own output cannot show this, as x is zero past K."""
    _interpreted("import triton_probes\ntriton_probes.check_gemv_tile_masks()\n")


def test_int4_magic_levels_are_exact_in_bf16_and_fp16():
    """The int4 nibble -> 16-bit float by bits (triton_wo._nibble_off, bf16 and fp16) and the levels q - z made from
    two of them (fp16), through Triton's interpreter: bf16 arithmetic runs only on CUDA (the interpreter has none),
    its bit trick here."""
    _interpreted("import triton_probes\ntriton_probes.check_nibble_levels()\n")


def test_gemv_fusions_match_the_plain_ops():
    """The batch-1 GEMV with the norm, gated activation and residual inside ($EF_WO_FUSE=1) against the same kernel
    and torch's ops, through Triton's interpreter (triton_probes.check_gemv_fusions); and a decoder's batch-1 decode
    with them against the unfused kernels, every fusion taken (the quantized lm_head's final norm too), none in
    prefill but the head's (check_fused_decode)."""
    _interpreted("import triton_probes\ntriton_probes.check_gemv_fusions()\ntriton_probes.check_fused_decode()\n")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
def test_gemv_fusions_on_cuda():
    """As above on the GPU (PRMT levels, the default launches at a LLaMA-7B layer's K; fp16 and bf16)."""
    import triton_probes

    triton_probes.check_gemv_fusions("cuda", (torch.float16, torch.bfloat16))


def test_triton_weight_only_kernel_matches_the_torch_reference():
    """Through Triton's interpreter on CPU, in a fresh process (TRITON_INTERPRET is read when triton is
    imported, and earlier tests of a session import it): fp32 and fp16, int4 g64 / g128 / per channel, int8."""
    code = ("import torch, test_quant as t, runtime.quant.triton_wo as k\n"
            "for dt in (torch.float32, torch.float16):\n"
            "    for mode, M in (('int4_wo_g64', 1), ('int4_wo_g128', 8), ('int4_wo', 3), ('int8_wo', 5)):\n"
            "        t._kernel_vs_reference(k, mode, M, dt, 'cpu')\n"
            "    for mode in ('int4_wo_g64', 'int4_wo', 'int8_wo'):\n"  # split K, and the batch-1 GEMV split or not
            "        t._kernel_vs_reference(k, mode, 5, dt, 'cpu', BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3)\n"
            "        for magic, K in ((False, 256), (True, 256), (True, 320 if mode == 'int4_wo_g64' else 288)):\n"
            "            t._kernel_vs_reference(k, mode, 5, dt, 'cpu', N=40, K=K, BLOCK_M=16, BLOCK_N=16,\n"
            "                                   BLOCK_K=64, SPLIT_K=3, NATURAL=True, MAGIC=magic)\n"  # the tile as
            # stored, int4 interleaved: one dot (MAGIC: fp16 only; K 288: a masked last tile, per channel)
            "        t._kernel_vs_reference(k, mode, 5, dt, 'cpu', N=40, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3,\n"
            "                               MAGIC=True)\n"  # int4 in fp16: nibbles to 1024 + q by bits (fp32: off)
            "        for magic, xsplit, join in ((False, True, False), (True, True, False), (False, False, True),\n"
            "                                    (True, False, True)):\n"  # int4: x read contiguously, parted even / odd
            "            t._kernel_vs_reference(k, mode, 5, dt, 'cpu', N=40, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64,\n"
            "                                   SPLIT_K=3, XSPLIT=xsplit, JOIN=join, MAGIC=magic)\n"
            "        for split, magic in ((1, False), (3, False), (3, True)):\n"  # MAGIC: int4's nibbles to fp32 by bits
            "            t._kernel_vs_reference(k, mode, 1, dt, 'cpu', GEMV=True, BLOCK_N=16, BLOCK_K=64, SPLIT_K=split,\n"
            "                                   MAGIC=magic)\n"
            "    for mode in ('int4_wo_g64', 'int4_wo', 'int8_wo'):\n"
            "        t._dequantize_vs_reference(k, mode, dt, 'cpu')\n"
            # int8 per channel at batch 1: the default (512-byte K steps, a masked last tile, no split) and a split
            "    t._kernel_vs_reference(k, 'int8_wo', 1, dt, 'cpu', K=1088)\n"
            "    t._kernel_vs_reference(k, 'int8_wo', 1, dt, 'cpu', K=2112, GEMV=True, BLOCK_N=32, BLOCK_K=512,\n"
            "                           SPLIT_K=2, MAGIC=True, num_warps=8)\n"
            # the GEMV's tiles of several whole groups (NG), the last past K, split or not, MAGIC or not
            "    for mode, K, bk in (('int4_wo_g64', 320, 256), ('int4_wo_g128', 384, 256), ('int4_wo_g32', 96, 64)):\n"
            "        for split, magic in ((1, True), (2, False)):\n"
            "            t._kernel_vs_reference(k, mode, 1, dt, 'cpu', K=K, GEMV=True, BLOCK_N=16, BLOCK_K=bk,\n"
            "                                   SPLIT_K=split, MAGIC=magic)\n"
            # the GEMV's weight tiles fetched one or two steps ahead (PREFETCH): whole tiles and a masked last tile,
            # split or not, int8 and int4 (NG 2 at g128); what a tile past K reads: test_gemv_weight_tiles_read_...
            "    for mode, K, bk, split, ahead in (('int8_wo', 1088, 512, 1, 2), ('int8_wo', 2048, 256, 2, 1),\n"
            "                                      ('int4_wo_g128', 1024, 256, 1, 2), ('int4_wo_g64', 320, 64, 2, 2),\n"
            "                                      ('int4_wo', 288, 64, 1, 1)):\n"
            "        t._kernel_vs_reference(k, mode, 1, dt, 'cpu', N=40, K=K, GEMV=True, BLOCK_N=16, BLOCK_K=bk,\n"
            "                               SPLIT_K=split, MAGIC=True, PREFETCH=ahead, REDUCE=split > 1)\n"
            # K splits added by the tile's last program in the kernel (REDUCE), the GEMM's and the GEMV's
            "    for mode in ('int4_wo_g64', 'int8_wo'):\n"
            "        t._kernel_vs_reference(k, mode, 20, dt, 'cpu', N=40, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64,\n"
            "                               SPLIT_K=3, REDUCE=True)\n"
            "        t._kernel_vs_reference(k, mode, 1, dt, 'cpu', N=40, GEMV=True, BLOCK_N=16, BLOCK_K=64,\n"
            "                               SPLIT_K=3, REDUCE=True)\n"
            # int8's GEMM MAGIC (q - z through fp32 bits) with a masked last K tile
            "    t._kernel_vs_reference(k, 'int8_wo', 5, dt, 'cpu', K=320, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256,\n"
            "                           SPLIT_K=1, MAGIC=True)\n"
            # SWAP: out^T = W x^T (the weight the MMA's left operand), split or not, added in the kernel or not,
            # int8 and int4 with and without MAGIC (int4's: fp16 only); rows and features not multiples of the tiles
            "    for mode, K, magic, split, red in (('int8_wo', 320, True, 1, False), ('int8_wo', 288, False, 3, True),\n"
            "                                       ('int4_wo_g64', 320, False, 3, False), ('int4_wo_g64', 320, False, 3, True),\n"
            "                                       ('int4_wo', 288, False, 1, False), ('int4_wo_g64', 320, True, 3, True),\n"
            "                                       ('int4_wo', 288, True, 1, False)):\n"  # 288: a masked last K tile
            "        t._kernel_vs_reference(k, mode, 5, dt, 'cpu', N=40, K=K, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64,\n"
            "                               SPLIT_K=split, REDUCE=red, MAGIC=magic, SWAP=True)\n"
            # int4 at batch 1 with its default launch shape at a layer's K (512-feature tiles, K split 4, REDUCE)
            "t._kernel_vs_reference(k, 'int4_wo_g128', 1, torch.float16, 'cpu', N=32, K=4096)\n"
            # per channel the same 512-feature tiles at any K (a row is one group): 4.5 tiles, split 2
            "assert k.default_config(1, 32, 2304, 2304, 132, 4)['BLOCK_K'] == 512\n"
            "t._kernel_vs_reference(k, 'int4_wo', 1, torch.float16, 'cpu', N=32, K=2304)\n"
            # int8 per channel at 33-64 rows with its default (SWAP 64 x 64 x 128, K split 2 added in the kernel)
            "assert k.default_config(40, 96, 640, 640, 132)['SWAP']\n"
            "t._kernel_vs_reference(k, 'int8_wo', 40, torch.float16, 'cpu', N=96, K=640)\n"
            # int4 g128 the same at 33-64 rows (SWAP + MAGIC, int4's fp16 x)
            "assert k.default_config(40, 96, 640, 128, 132, 4)['SWAP']\n"
            "t._kernel_vs_reference(k, 'int4_wo_g128', 40, torch.float16, 'cpu', N=96, K=640)\n")
    _interpreted(code)


def _w8a8_vs_reference(kernel, fmt, M, N, K, dtype, device, per_row, **cfg):
    """The W8A8 GEMM (runtime/quant/triton_w8a8.py) against the reference arithmetic: int8 gives its bits (the
    int32 is exact, the epilogue the same), E4M3 its fp32 matmul within fp32 rounding."""
    from runtime.quant.fp8 import E4M3
    from runtime.quant.sq import int8_matmul

    g = torch.Generator().manual_seed(M * N + K)
    if fmt == "int8":
        x, w = (torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in ((M, K), (N, K)))
    else:
        x, w = ((torch.randn(s, generator=g) * 40).clamp(-448, 448).to(E4M3) for s in ((M, K), (N, K)))
    xs = (torch.rand(M, 1, generator=g) if per_row else torch.rand(1, generator=g)) * 1e-3
    ws = (torch.rand(N, generator=g) if per_row else torch.rand(1, generator=g)) * 1e-3
    acc = int8_matmul(x, w).float() if fmt == "int8" else x.double() @ w.double().T
    want = (acc.float() * (xs * ws)).to(dtype)
    got = kernel.launch(x.to(device), w.to(device), xs.to(device), ws.to(device), dtype, **cfg).cpu()
    assert got.dtype == dtype and got.shape == (M, N)
    if fmt == "int8":
        assert torch.equal(got, want), (M, N, K, cfg)
    else:
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], (M, N, K, cfg, err)


def test_triton_w8a8_gemm_matches_the_reference():
    """int8 x int8 and E4M3 x E4M3 through Triton's interpreter on CPU (a fresh process, as above): per-row and
    per-tensor scales, M of one and of several tiles, split K, ragged N and K."""
    code = ("import torch, test_quant as t, runtime.quant.triton_w8a8 as k\n"
            "for fmt in ('int8', 'fp8'):\n"
            "    for dt in (torch.float32, torch.float16):\n"
            "        for per_row in (True, False):\n"
            "            t._w8a8_vs_reference(k, fmt, 5, 48, 256, dt, 'cpu', per_row)\n"
            "            t._w8a8_vs_reference(k, fmt, 1, 40, 384, dt, 'cpu', per_row)\n"
            "            t._w8a8_vs_reference(k, fmt, 20, 72, 300, dt, 'cpu', per_row, BLOCK_M=16, BLOCK_N=16,\n"
            "                                 BLOCK_K=64, SPLIT_K=3, num_warps=4)\n")
    _interpreted(code)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_triton_w8a8_gemm_on_cuda(fmt, dtype):
    import runtime.quant.triton_w8a8 as kernel

    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 tensor cores need sm >= 89")
    for M in (1, 8, 17, 64):  # decode batches: each BLOCK_M, one and several K splits
        for N, K in ((1024, 2048), (4096, 4096), (1000, 2040)):
            for per_row in (True, False):
                _w8a8_vs_reference(kernel, fmt, M, N, K, dtype, "cuda", per_row)
    _w8a8_vs_reference(kernel, fmt, 24, 520, 1000, dtype, "cuda", True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, SPLIT_K=5,
                       num_warps=4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["int4_wo_g128", "int4_wo", "int8_wo"])
def test_triton_weight_only_kernel_on_cuda(wo_kernel, mode, dtype, monkeypatch):
    for M in (1, 8, 64, 300):  # decode batches and a prefill
        _kernel_vs_reference(wo_kernel, mode, M, dtype, "cuda", N=1024, K=2048)
    _dequantize_vs_reference(wo_kernel, mode, dtype, "cuda", N=1024, K=2048)
    for M, cfg in ((1, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 4}),
                   (1, {"GEMV": True, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "MAGIC": True}),
                   (1, {"GEMV": True, "BLOCK_N": 32, "BLOCK_K": 1024, "SPLIT_K": 1, "num_warps": 8, "MAGIC": True}),
                   (1, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 2, "num_warps": 8, "MAGIC": True,
                        "PREFETCH": 2}),  # (the int8 default at batch 1 and 1,024 outputs: PREFETCH 1, split 2)
                   (8, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4}),
                   (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "NATURAL": True}),
                   (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "MAGIC": False}),
                   (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "MAGIC": True}),
                   (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "XSPLIT": True}),
                   (16, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "XSPLIT": True,
                         "MAGIC": True}),
                   (64, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 8, "JOIN": True}),
                   (16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "JOIN": True,
                         "MAGIC": True}),
                   # the tile as stored with MAGIC (int4: OFF + q by bits, bf16 here too), SWAP'd or not
                   (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "SWAP": True,
                         "MAGIC": True, "REDUCE": True}),
                   # SWAP without MAGIC (int4's default at 33-64 rows where the programs outnumbered the SMs until
                   # MAGIC's second form; in the sweep's grid)
                   (64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3,
                         "SWAP": True, "MAGIC": False}),
                   (16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "NATURAL": True,
                         "MAGIC": True})):
        _kernel_vs_reference(wo_kernel, mode, M, dtype, "cuda", N=1024, K=2048, **cfg)
    # the GEMV's levels by byte permutes (PRMT, inline PTX: never run by the interpreter tests): the default launch
    # with it allowed (int8's default has it) and not ($EF_WO_PRMT=0), several whole groups a tile (int4 g128: NG 4),
    # a ragged K (a masked last tile: int8's default 1024-wide tiles at K 2112, as at LLaMA-7B's mlp.down), tiles
    # fetched ahead
    ragged = (2176, 512) if mode == "int4_wo_g128" else (2112, 128)  # (K, BLOCK_K): a partial last tile
    for prmt, K in ((True, 2048), (False, 2048), (True, ragged[0])):
        _kernel_vs_reference(wo_kernel, mode, 1, dtype, "cuda", N=1024, K=K, prmt=prmt)
    for K, cfg in ((2048, {"GEMV": True, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 2, "num_warps": 4, "MAGIC": True,
                           "REDUCE": True}),
                   (2560, {"GEMV": True, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 8, "MAGIC": True,
                           "PREFETCH": 1}),
                   (ragged[0], {"GEMV": True, "BLOCK_N": 32, "BLOCK_K": ragged[1], "SPLIT_K": 1, "num_warps": 4,
                                "MAGIC": False})):
        _kernel_vs_reference(wo_kernel, mode, 1, dtype, "cuda", N=1024, K=K, PRMT=True, **cfg)
    w = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(5))
    t = {k: v.cuda() for k, v in MODES[mode].quantize(w, dtype).items()}
    bits = 8 if mode == "int8_wo" else 4
    group = 2048 // (t["scale"].numel() // 1024)
    shipped = wo_kernel.default_config(64, 1024, 2048, group, 132, bits)  # (int8: SWAP, K split 4 in the kernel)
    for M, cfg in ((64, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4}),
                   (1, {"GEMV": True, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "MAGIC": True}),
                   (64, {**shipped, "SPLIT_K": max(2, shipped["SPLIT_K"])})):
        cfg = {**cfg, "REDUCE": True}  # the K splits added in the kernel by each tile's last program
        _kernel_vs_reference(wo_kernel, mode, M, dtype, "cuda", N=1024, K=2048, **cfg)
        x = torch.randn(M, 2048, device="cuda", dtype=dtype)
        empty = torch.empty
        with monkeypatch.context() as mp:  # partials and output NaN-filled at each launch: a slice read before it
            mp.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))  # was written shows
            runs = [wo_kernel.launch(x, t["weight"], t["scale"], t.get("zero"), bits, **cfg) for _ in range(20)]
        assert not runs[0].isnan().any()
        assert all(torch.equal(r, runs[0]) for r in runs), "the sum depends on which program arrived last"
    if mode == "int8_wo":  # int8's GEMM MAGIC (bf16: fp32's upper half) in the W8A8 GEMM's best shape, K ragged
        for M in (64, 40):
            _kernel_vs_reference(wo_kernel, mode, M, dtype, "cuda", N=1024, K=2112, BLOCK_M=64, BLOCK_N=32,
                                 BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=4, MAGIC=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["int4_wo_g128", "int4_wo_g32", "int4_wo", "int8_wo"])
def test_cuda_weight_only_linear_at_every_batch_matches_the_reference(wo_kernel, mode, dtype, monkeypatch):
    """What an engine runs on CUDA (EF_WO_KERNEL=auto: tinygemm / Triton / dequantize + cuBLAS by batch size)
    against the plain-torch reference, on each side of each switch; int4 in bf16 takes our GEMV at batch 1 and
    tinygemm at 2-16, and tinygemm at batch 1 too where PRMT does not run ($EF_WO_PRMT=0)."""
    from runtime.quant import make_linear, triton_wo

    w = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(3))
    stored = {f"l.{k}": v.cuda() for k, v in MODES[mode].quantize(w, dtype).items()}
    lin = make_linear(mode, stored, "l")
    assert lin.kernel == "cuda"
    assert (getattr(lin, "tiny", None) is not None) == (mode != "int8_wo" and dtype == torch.bfloat16)
    ref = make_linear(mode, {k: v.cpu() for k, v in stored.items()}, "l")
    for M, prmt in ((1, True), (1, False), (2, True), (16, True), (17, True), (64, True), (65, True), (300, True)):
        monkeypatch.setattr(triton_wo, "PRMT", prmt)
        x = torch.randn(M, 2048, generator=torch.Generator().manual_seed(M)).to(dtype)
        want = ref(x.float()).double()
        got = lin(x.cuda())
        assert got.dtype == dtype and got.shape == (M, 1024)
        err = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert err <= {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], (M, prmt, err)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["int4_wo_g128", "int8_wo"])
def test_cuda_weight_only_head_of_an_odd_vocabulary(wo_kernel, mode, dtype, monkeypatch):
    """A quantized lm_head (precision.quant_lm_head) is the widest linear and the first with an odd number of rows
    (GPT-2's 50,257: no tinygemm, ragged tiles): each batch path against the plain-torch reference, and at batch 1
    with the final RMSNorm inside the GEMV ($EF_WO_FUSE=1) against the norm then the reference."""
    from runtime.quant import make_linear, triton_wo

    N, K = 50257, 512
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    stored = {f"l.{k}": v.cuda() for k, v in MODES[mode].quantize(w, dtype).items()}
    monkeypatch.setattr(triton_wo, "FUSE", True)
    lin = make_linear(mode, stored, "l")
    assert lin.kernel == "cuda" and lin.fuses and getattr(lin, "tiny", None) is None
    ref = make_linear(mode, {k: v.cpu() for k, v in stored.items()}, "l")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for M in (1, 2, 65):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        want = ref(x.float()).double()
        got = lin(x.cuda())
        assert got.shape == (M, N) and (got.cpu().double() - want).abs().max() / want.abs().max() <= tol, M
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(9)).to(dtype)
    gain = (1 + 0.1 * torch.randn(K, generator=torch.Generator().manual_seed(10))).to(dtype)
    normed = gain * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    want = ref(normed.float()).double()
    got = lin.fused(x.cuda(), norm=gain.cuda(), eps=1e-5)
    assert got is not None and (got.cpu().double() - want).abs().max() / want.abs().max() <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")
def test_triton_weight_only_kernel_compiles_and_graph_captures(wo_kernel):
    from runtime.quant import make_linear

    q = {f"l.{k}": v.cuda() for k, v in MODES["int4_wo_g128"].quantize(torch.randn(512, 1024), torch.float16).items()}
    lin = make_linear("int4_wo_g128", q, "l")
    assert lin.kernel == "cuda"
    # Triton, tinygemm, dequant + cuBLAS, and the batch-1 GEMV with PRMT and its K split added in the kernel
    for dtype, M, K in ((torch.float16, 8, 1024), (torch.bfloat16, 4, 1024), (torch.bfloat16, 80, 1024),
                        (torch.bfloat16, 1, 4096)):
        if dtype == torch.bfloat16:
            q16 = MODES["int4_wo_g128"].quantize(torch.randn(512, K), dtype).items()
            lin = make_linear("int4_wo_g128", {f"l.{k}": v.cuda() for k, v in q16}, "l")
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        f = torch.compile(lambda x: lin(x), fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            y = f(x)
        torch.testing.assert_close(y, lin(x))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int4_engines_of_each_family_build_validate_and_generate(tmp_path, family, one_thread):
    """Each int4 preset through the public pipeline (validation against transformers in fp32 with the mode's
    own bounds), loaded and generating."""
    for mode in INT4_ENGINES:
        engine_dir = _dummy(tmp_path, family, f"precision={mode}")
        v = json.loads((engine_dir / "validation.json").read_text())["parity"]
        assert v["passed"], (mode, v)
        engine = Engine.load(engine_dir, device="cpu")
        out = engine.generate([[1, 2, 3], [5, 6]], max_new_tokens=4, ignore_eos=True)
        assert [len(o.output_ids) for o in out] == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_tp2_gives_tp1_greedy_tokens_for_each_weight_only_mode(tmp_path, family, one_thread):
    """The whole weight is quantized, then each stored tensor cut by its weight's rule: tp2's rank files put
    together are tp1's, so the same tokens. The float part is fp32: in fp16 the all-reduce's different
    summation order flipped a near-tie of a random dummy (int4_wo, llama, token 8), not the stored numbers."""
    prompts = [[1, 2, 3, 4], [7, 8]]
    for mode in ("int8_wo",) + INT4_ENGINES:
        toks = []
        for tp in (1, 2):
            d = _dummy(tmp_path, family, f"precision={mode}", "precision.dtype=fp32", f"parallel.tp={tp}",
                       "validate.enabled=false", wide=True)
            engine = Engine.load(d, device="cpu")
            try:
                toks.append([o.output_ids for o in engine.generate(prompts, max_new_tokens=8, ignore_eos=True)])
            finally:
                engine.close()
        assert toks[0] == toks[1], mode


def test_int4_g128_rank_file_is_about_a_quarter_of_fp16(tmp_path, one_thread):
    from safetensors import safe_open

    dirs = {p: _dummy(tmp_path, "llama", f"precision={p}", "validate.enabled=false") for p in ("fp16", "int4_wo_g128")}

    def linear_bytes(d):
        with safe_open(str(d / "rank0.safetensors"), framework="pt") as f:
            return sum(f.get_tensor(n).nbytes for n in f.keys() if any(f".{lin}." in n for lin in LINEARS))
    ratio = linear_bytes(dirs["int4_wo_g128"]) / linear_bytes(dirs["fp16"])
    assert abs(ratio - (0.5 + 3 / 128) / 2) < 0.01, ratio  # 4 bits + (fp16 scale + uint8 zero) / 128 weights: 0.262
    sizes = {p: (d / "rank0.safetensors").stat().st_size for p, d in dirs.items()}
    assert sizes["int4_wo_g128"] < 0.5 * sizes["fp16"]  # the embedding and lm_head stay fp16


@pytest.mark.slow  # two CLI runs, ~20 s
def test_group_that_straddles_ranks_is_one_line(cli, store):
    from helpers import assert_one_clear_line

    config = FAMILIES["llama"].replace("hidden_size:128", "hidden_size:192").replace("num_attention_heads:4", "num_attention_heads:6")
    assert_one_clear_line(cli("model.source=dummy", f"+model.config={{{config}}}", f"store={store}",
                              "precision=int4_wo_g128"),
                          "precision.quant=int4_wo_g128", "in_features=192", "group size 128", "int4_wo_g64")
    assert_one_clear_line(cli("model.source=dummy", f"+model.config={{{FAMILIES['llama']}}}", f"store={store}",
                              "precision=int4_wo_g128", "parallel.tp=2"),
                          "attn.o", "tp=2", "64 per rank", "int4_wo_g64", "parallel.tp=1")


def test_a_quant_mode_version_is_in_the_hash(tmp_path, monkeypatch, one_thread):
    """A mode whose quantize() changes says so by its version: the same recipe is then another engine (a
    stale cache hit would serve the old bytes); float engines carry no such key."""
    from runtime.quant import MODES

    first = _dummy(tmp_path, "llama", "precision=int8_wo", "validate.enabled=false")
    fp16 = _dummy(tmp_path, "llama", "precision=fp16", "validate.enabled=false")
    assert _dummy(tmp_path, "llama", "precision=int8_wo", "validate.enabled=false") == first
    monkeypatch.setattr(MODES["int8_wo"], "version", 2, raising=False)
    monkeypatch.setattr(MODES["none"], "version", 2, raising=False)
    assert _dummy(tmp_path, "llama", "precision=int8_wo", "validate.enabled=false") != first
    assert _dummy(tmp_path, "llama", "precision=fp16", "validate.enabled=false") == fp16


def test_cpu_fp32_dense_weights_are_read_as_their_transpose():
    """On CPU, fp32 dense weights (and the lm_head) keep their (out, in) shape and values with the in-features
    outermost in memory (runtime/quant/dense.py: the BLAS's faster matrix-vector product; SmolLM2-135M eager
    decode +20% on this machine, 2026-12-07): the products are F.linear's on the stored weight; bf16 stays as
    stored (there the row-major product is the faster)."""
    import torch.nn.functional as F
    from helpers import random_decoder

    from runtime.quant.dense import DenseLinear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 40, generator=g), torch.randn(3, 40, generator=g)
    lin = DenseLinear({"weight": w})
    assert lin.weight.shape == w.shape and lin.weight.stride() == (1, 96) and torch.equal(lin.weight, w)
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=1e-6, atol=1e-6)
    assert DenseLinear({"weight": w.bfloat16()}).weight.stride() == (40, 1)
    d = random_decoder("rope_gqa", torch.float32, "cpu")
    assert d.lm_head.stride() == (1, d.lm_head.shape[0]) and d.layers[0].qkv.weight.stride()[0] == 1
