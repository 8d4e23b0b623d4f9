"""precision.kv_cache=int8 / fp8 on every family (tests/tiny_families.py): GPT-2 (learned positions), BLOOM
(ALiBi), GPT-BigCode (MQA: one KV head) and LLaMA (GQA, rotary): each builds, generates, and its decode logits
stay within the format's bound of the same engine with kv auto, fed the same tokens (the cache is what
differs). tp2 == tp1 with a quantized cache: tests/test_tp_precisions.py."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import build_in_process
from runtime import Engine
from runtime.kv_cache import KV_FORMATS
from test_kv_cache import PROMPTS
from tiny_families import CONFIGS, family_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"int8": 0.05, "fp8": 0.15}  # as tests/test_kv_cache.py; measured here: int8 <= 0.042, fp8 <= 0.089 (llama)


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    return tmp_path_factory.mktemp("kv-families")


def _decode(engine_dir, prompts, feed=None, steps=8):
    """(tokens fed, decode logits (steps, B, vocab)) after a prefill of prompts: the engine's own greedy
    tokens, or `feed` (another engine's), so that both caches hold the same sequences."""
    eng = Engine.load(engine_dir, device="cpu")
    dec = eng.model
    dec.allocate_cache(len(prompts), 64)
    flat, lengths = torch.tensor(sum(prompts, [])), [len(p) for p in prompts]
    logits, pos, fed, out = dec.prefill(flat, lengths), torch.tensor(lengths), [], []
    for s in range(steps):
        tok = logits.argmax(-1) if feed is None else feed[s]
        fed.append(tok)
        logits = dec.decode(tok, pos)
        out.append(logits.float())
        pos = pos + 1
    return eng, fed, torch.stack(out)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_quantized_cache_of_each_family_is_close_to_kv_auto(area, family, kv):
    ckpt = family_checkpoint(area, family)
    base = ("precision=fp32", "validate.enabled=false")
    auto = build_in_process(ckpt, area / "store", *base)
    got = build_in_process(ckpt, area / "store", *base, f"precision.kv_cache={kv}", "calibration=random")
    assert json.loads((got / "engine.json").read_text())["quant"]["kv_cache"] == kv
    _, fed, want = _decode(auto, PROMPTS)
    eng, _, have = _decode(got, PROMPTS, feed=fed)
    assert eng.model.k_cache[0].dtype == KV_FORMATS[kv].storage
    rel = ((have - want).abs().max() / want.abs().max()).item()
    assert 0 < rel <= TOL[kv], rel  # 0 would mean the cache was not quantized
    out = eng.generate([[1, 2, 3], [5, 6, 7, 8]], max_new_tokens=6, ignore_eos=True)
    assert [len(o.output_ids) for o in out] == [6, 6]


def test_fp8_weights_with_an_fp8_cache(area):
    """The two fp8s combine: one calibration gives both the linears' input scales and the K/V scales."""
    ckpt = family_checkpoint(area, "llama")
    got = build_in_process(ckpt, area / "store", "precision=fp8", "precision.kv_cache=fp8", "calibration=random")
    v = json.loads((got / "validation.json").read_text())["parity"]
    assert v["passed"], v  # against transformers fp32, with fp8's bounds
    eng = Engine.load(got, device="cpu")
    out = eng.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
    assert len(out[0].output_ids) == 4 and eng.model.k_cache[0].dtype == torch.float8_e4m3fn
