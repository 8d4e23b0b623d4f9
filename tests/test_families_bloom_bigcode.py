"""BLOOM and GPT-BigCode against transformers: ALiBi slopes, fused-qkv layouts (BLOOM's per-head
interleave, BigCode's MQA and MHA), fp32 logits and greedy tokens, the published model configs, and one
CLI build per family."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from engine_factory import config, families
from engine_factory.checks import check_config, check_model
from engine_factory.layout import canonical_shapes
from helpers import (LIMITS, assert_scores_match, build_in_process, engine_path, hf_greedy, hf_logits, hf_model,
                     random_checkpoint, rank_digests)
from runtime import Engine
from runtime.model import alibi_slopes

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 384
PROMPT_LENS = [3, 17, 8, 1, 12]  # different lengths, one of a single token, more than max_batch_size (4)
NEW_TOKENS = 32
BLOOM = {"vocab_size": VOCAB, "n_layer": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
BIGCODE = {"vocab_size": VOCAB, "n_layer": 2, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}
CHECKPOINTS = {  # name -> (transformers class, config): the special cases of each family
    "bloom_6_heads": ("Bloom", dict(BLOOM, hidden_size=48, n_head=6)),  # not a power of two: extra slopes
    "bloom_8_heads": ("Bloom", dict(BLOOM, hidden_size=64, n_head=8)),
    "bigcode_mqa": ("GPTBigCode", dict(BIGCODE, n_embd=64, n_head=8, n_inner=96, multi_query=True)),
    "bigcode_mha": ("GPTBigCode", dict(BIGCODE, n_embd=48, n_head=4, multi_query=False, activation_function="gelu")),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> a tiny HF folder of the real class, every parameter random (biases and norms
    too, so a misplaced bias row or norm cannot hide behind HF's zero/one init)."""
    made = {}

    def get(name: str):
        if name not in made:
            kind, cfg = CHECKPOINTS[name]
            made[name] = random_checkpoint(tmp_path_factory.mktemp("ckpt") / name, kind, cfg,
                                           seed=list(CHECKPOINTS).index(name))
        return made[name]
    return get


@pytest.fixture(scope="module")
def engine_of(checkpoint, tmp_path_factory):
    store, built = tmp_path_factory.mktemp("bloom-bigcode-store"), {}

    def get(name: str):
        if name not in built:
            engine_dir = build_in_process(checkpoint(name), store, "precision=fp32", "validate.enabled=false")
            built[name] = Engine.load(engine_dir, device="cpu"), hf_model(checkpoint(name)), engine_dir
        return built[name]
    return get


def _prompts(lens, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12, 16, 20, 48, 112])
def test_alibi_slopes_match_transformers(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # public in 4.x and 5.x

    slopes = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope x key position 1
    torch.testing.assert_close(alibi_slopes(heads), slopes, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_spec_flags(engine_of, name):
    engine, ref, _ = engine_of(name)
    s, c = engine.spec, ref.config
    assert (s.num_heads, s.hidden_size, s.tie_word_embeddings) == (c.num_attention_heads, c.hidden_size, True)
    if name.startswith("bloom"):
        assert (s.position, s.embedding_norm, s.num_kv_heads, s.activation) == ("alibi", True, s.num_heads, "gelu_tanh")
    else:
        assert (s.position, s.embedding_norm) == ("learned", False)
        assert s.num_kv_heads == (1 if c.multi_query else c.n_head)
        assert s.intermediate_size == (c.n_inner or 4 * c.n_embd)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fp32_logits_match_transformers(engine_of, name):
    engine, ref, _ = engine_of(name)
    prompts = _prompts([1, 5, 23, 64], seed=0)  # 64 = max_input_len
    assert_scores_match(engine, prompts, lambda ids: hf_logits(ref, ids))  # batched and one by one


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fp32_greedy_batch_matches_transformers(engine_of, name):
    engine, ref, _ = engine_of(name)
    prompts = _prompts(PROMPT_LENS, seed=1)
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [g.prompt_ids for g in gens] == prompts
    for ids, g in zip(prompts, gens):
        assert g.finish_reason == "length"
        assert g.output_ids == hf_greedy(ref, ids, NEW_TOKENS)


def test_bloom_checkpoint_without_transformer_prefix_builds_the_same_weights(engine_of, checkpoint, tmp_path):
    _, _, engine_dir = engine_of("bloom_6_heads")
    src = checkpoint("bloom_6_heads")
    bare = tmp_path / "bloom-bare"
    bare.mkdir()
    (bare / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in tensors if k != "lm_head.weight")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(bare / "model.safetensors"),
              metadata={"format": "pt"})
    again = build_in_process(bare, tmp_path / "store", "precision=fp32", "validate.enabled=false")
    assert rank_digests(again) == rank_digests(engine_dir)


# ---- the published model configs: compose, pass the checks, and have the published parameter counts ------
MODEL_CONFIGS = {  # BLOOM: exact counts from the model cards; BigCode: "1.1B" and "15.5B"
    "bloom_560m": ("bloom", 16, 559_214_592), "bloom_176b": ("bloom", 112, 176_247_271_424),
    "santacoder": ("gpt_bigcode", 1, 1.1e9), "starcoder": ("gpt_bigcode", 1, 15.5e9),
}


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_composes_with_the_published_size(name):
    family, kv_heads, params = MODEL_CONFIGS[name]
    cfg = config.compose([f"model={name}", "model.source=dummy"])
    check_config(cfg)
    hf = OmegaConf.to_container(cfg.model.config)
    fam = families.resolve(hf)
    spec = fam.spec(hf)
    check_model(cfg, spec)
    assert fam.model_type == family and spec.num_kv_heads == kv_heads
    assert cfg.model.source == "dummy" and config.compose([f"model={name}"]).model.source.startswith("hf://")
    count = sum(math.prod(s) for s in canonical_shapes(spec).values())
    if isinstance(params, int):
        assert count == params
    else:
        assert abs(count / params - 1) < 0.03, count


# ---- one build per family through the command line, validated against transformers there ---------------
@pytest.mark.parametrize("name", ["bloom_6_heads", "bigcode_mqa"])
def test_cli_build_validates_against_transformers(checkpoint, cli, store, name):
    engine = engine_path(cli(f"model.source={checkpoint(name)}", "precision=fp32", f"store={store}", *LIMITS))
    parity = json.loads((engine / "validation.json").read_text())["parity"]
    assert parity["passed"] and parity["greedy_identical"] and parity["max_abs_logits"] <= 1e-4
    spec = json.loads((engine / "engine.json").read_text())["spec"]
    assert spec["family"] == ("bloom" if name.startswith("bloom") else "gpt_bigcode")
