"""INT8 weight-only engines (precision=int8_wo): what the rank file stores, against the checkpoint's own
weights, and what the engine computes, against transformers in fp32."""
from __future__ import annotations

import json

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
    assert err.strip().splitlines()[-1] == ("error: precision.quant=int3_wo is not one of int4_wo, int4_wo_g128, "
                                            "int4_wo_g64, int8_wo, none")
