"""Engines against transformers (the independent reference): logits and greedy tokens in fp32, stated
error bounds in fp16/bf16, and sampling behaviour."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_scores_match, build_in_process, hf_greedy, hf_logits, hf_model
from runtime import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ["tiny_llama", "tiny_llama_mha", "tiny_gpt2"]
# Different lengths, one of a single token, and more prompts than the engines' max_batch_size (4).
PROMPT_LENS = [3, 17, 8, 1, 12]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def engine_of(request, tmp_path_factory):
    """engine_of(model fixture name, dtype) -> (Engine on CPU, checkpoint folder), built once per module."""
    store = tmp_path_factory.mktemp("parity-store")
    built = {}

    def get(model: str, dtype: str):
        if (model, dtype) not in built:
            folder = request.getfixturevalue(model)
            engine_dir = build_in_process(folder, store, f"precision={dtype}", "validate.enabled=false")
            built[model, dtype] = Engine.load(engine_dir, device="cpu"), folder
        return built[model, dtype]
    return get


@pytest.fixture(scope="module")
def reference(request):
    """reference(model fixture name) -> the transformers model, fp32."""
    models = {}

    def get(model: str):
        if model not in models:
            models[model] = hf_model(request.getfixturevalue(model))
        return models[model]
    return get


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


# ---- fp32: the engine is transformers, to float rounding ---------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_fp32_logits_match_transformers(engine_of, reference, model):
    engine, _ = engine_of(model, "fp32")
    ref = reference(model)
    assert engine.model.dtype == torch.float32
    prompts = _prompts(engine.spec.vocab_size, lens=[1, 5, 23, 64])  # 64 = max_input_len
    assert_scores_match(engine, prompts, lambda ids: hf_logits(ref, ids))  # batched and one by one


@pytest.mark.parametrize("model", MODELS)
def test_fp32_greedy_batch_matches_transformers(engine_of, reference, model):
    engine, _ = engine_of(model, "fp32")
    ref = reference(model)
    prompts = _prompts(engine.spec.vocab_size, seed=1)
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert len(gens) == len(prompts)
    for ids, g in zip(prompts, gens):
        assert g.prompt_ids == ids
        assert g.finish_reason == "length"
        assert g.output_ids == hf_greedy(ref, ids, NEW_TOKENS)


def test_stop_tokens_end_a_sequence_where_the_reference_emits_them(engine_of, reference):
    engine, _ = engine_of("tiny_llama", "fp32")
    ref = reference("tiny_llama")
    ids = _prompts(engine.spec.vocab_size, lens=[9], seed=2)[0]
    want = hf_greedy(ref, ids, NEW_TOKENS)
    stop = want[5]
    (g,) = engine.generate([ids], max_new_tokens=NEW_TOKENS, stop_token_ids=[stop], ignore_eos=True)
    assert g.finish_reason == "stop"
    assert g.output_ids == want[:want.index(stop) + 1]
    # without ignore_eos the model's EOS ends it too (or nothing does, if the path has no EOS)
    eos = engine.spec.eos_token_ids[0]
    (g,) = engine.generate([ids], max_new_tokens=NEW_TOKENS)
    assert g.output_ids == (want[:want.index(eos) + 1] if eos in want else want)


def test_gpt2_text_prompt_uses_the_real_tokenizer(engine_of, reference, gpt2_tokenizer):
    engine, _ = engine_of("tiny_gpt2", "fp32")
    ref = reference("tiny_gpt2")
    text = "The capital of France is"
    (g,) = engine.generate(text, max_new_tokens=12, ignore_eos=True)
    assert g.prompt_ids == gpt2_tokenizer(text)["input_ids"] == [464, 3139, 286, 4881, 318]
    assert g.output_ids == hf_greedy(ref, g.prompt_ids, 12)
    assert g.text == gpt2_tokenizer.decode(g.output_ids, skip_special_tokens=True)


# ---- half precision: bounded error against the fp32 reference -------------------------------------------
# Unit roundoff is 2^-11 (4.9e-4) in fp16 and 2^-8 (3.9e-3) in bf16. Logits pass through 2 layers of
# matmuls over <= 128 terms with fp32 norms and softmax, so the error relative to the largest reference
# logit stays within ~20 roundoffs: 1e-2 (fp16), 5e-2 (bf16). Teacher-forced greedy (our argmax at each
# position of the reference's own greedy path) may flip only where the reference's top-2 gap is smaller
# than that error: rare with these logits in fp16 (>= 95% agree), less rare in bf16 (>= 85%).
HALF_BOUNDS = {"fp16": (1e-2, 0.95), "bf16": (5e-2, 0.85)}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("model", MODELS)
def test_half_precision_within_stated_bounds(engine_of, reference, model, dtype):
    engine, _ = engine_of(model, dtype)
    ref = reference(model)
    assert engine.model.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    max_rel, min_agree = HALF_BOUNDS[dtype]
    agree = total = 0
    for ids in _prompts(engine.spec.vocab_size, seed=3):
        want = hf_logits(ref, ids)
        rel = (engine.score(ids) - want).abs().max().item() / want.abs().max().item()
        assert rel <= max_rel, f"relative logits error {rel:.3g} > {max_rel}"
        path = hf_greedy(ref, ids, NEW_TOKENS)
        forced = engine.score(ids + path[:-1])[len(ids) - 1:].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(forced, path))
        total += len(path)
    assert agree / total >= min_agree, f"teacher-forced agreement {agree}/{total}"


# ---- sampling ------------------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible(engine_of):
    engine, _ = engine_of("tiny_llama", "fp32")
    prompts = _prompts(engine.spec.vocab_size, lens=[4, 9], seed=4)

    def sample(seed):
        return [g.output_ids for g in engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=1.0,
                                                      seed=seed, ignore_eos=True)]
    first = sample(123)
    assert sample(123) == first
    greedy = [g.output_ids for g in engine.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    # 64 tokens at temperature 1 over 512 ids: equal to another seed's or to greedy only if broken
    assert sample(124) != first
    assert first != greedy


def test_top_k_1_and_tiny_top_p_are_greedy(engine_of):
    engine, _ = engine_of("tiny_llama_mha", "fp32")
    prompts = _prompts(engine.spec.vocab_size, lens=[2, 11, 6], seed=5)
    greedy = [g.output_ids for g in engine.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    top_k = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=1, seed=7,
                            ignore_eos=True)
    top_p = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=1e-6, seed=7,
                            ignore_eos=True)
    assert [g.output_ids for g in top_k] == greedy
    assert [g.output_ids for g in top_p] == greedy


def test_top_k_samples_only_from_the_reference_top_k(engine_of, reference):
    engine, _ = engine_of("tiny_gpt2", "fp32")
    ref = reference("tiny_gpt2")
    k = 3
    ids = _prompts(engine.spec.vocab_size, lens=[6], seed=6)[0]
    (g,) = engine.generate([ids], max_new_tokens=NEW_TOKENS, temperature=2.0, top_k=k, seed=11,
                           ignore_eos=True)
    logits = hf_logits(ref, ids + g.output_ids[:-1])[len(ids) - 1:]  # the reference's view of each step
    allowed = logits.topk(k, dim=-1).indices.tolist()
    assert all(tok in top for tok, top in zip(g.output_ids, allowed))
    # at temperature 2 over 3 candidates, 32 draws that never leave the argmax would mean no sampling
    assert g.output_ids != [row[0] for row in allowed]


def test_compiled_decode_matches_transformers(engine_of, reference, tmp_path):
    """Engine.compile() (torch.compile of the decode step, what `--compile` does) changes speed, not
    tokens: a fresh engine on the same files, compiled, still reproduces transformers' greedy tokens."""
    engine, folder = engine_of("tiny_llama", "fp32")
    compiled = Engine.load(engine.engine_dir, device="cpu").compile()
    prompts = _prompts(engine.spec.vocab_size, lens=[3, 17, 1])
    outs = compiled.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert compiled.compiled
    assert compiled.inductor_options == {}  # (programmatic dependent launch: CUDA sm >= 90 only; test_cuda.py)
    for ids, g in zip(prompts, outs):
        assert g.output_ids == hf_greedy(reference("tiny_llama"), ids, 12)


def test_compile_options_are_the_defaults_under_the_callers(engine_of, monkeypatch):
    """Engine.compile(inductor): runtime.engine.decode_defaults (programmatic dependent launch on sm >= 90), each
    overridden by the caller's option of the same name; what was used is kept (runtime.bench's rows print it)."""
    import runtime.engine as engine_module

    engine, _ = engine_of("tiny_llama", "fp32")
    monkeypatch.setattr(engine_module, "decode_defaults", lambda device: {"triton.enable_pdl": True})
    e = Engine.load(engine.engine_dir, device="cpu")
    assert e.compile().inductor_options == {"triton.enable_pdl": True}
    assert e.compile({"triton.enable_pdl": False, "combo_kernels": True}).inductor_options == \
        {"triton.enable_pdl": False, "combo_kernels": True}


def test_pdl_is_the_default_on_hopper_unless_the_environment_says(monkeypatch):
    """runtime.engine.decode_defaults: Inductor's programmatic dependent launch on sm >= 90 only, and never over
    an explicit TORCHINDUCTOR_ENABLE_PDL (Inductor's own switch, which then decides)."""
    from runtime.engine import decode_defaults

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert decode_defaults(cuda) == {"triton.enable_pdl": True}
    assert decode_defaults(torch.device("cpu")) == {}
    for value in ("0", "1"):
        monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", value)
        assert decode_defaults(cuda) == {}
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert decode_defaults(cuda) == {}


@pytest.mark.parametrize("check_every", [3, 8])
def test_rows_stopping_at_different_steps_give_the_same_tokens_whatever_the_stop_check(tiny_llama, tmp_path,
                                                                                         check_every):
    """On CUDA the decode loop reads "has every row stopped?" only every Engine.stop_check steps (no sync per
    step; 1 on CPU, where a read is free): rows that stop at different steps, and a batch that stops before
    max_new_tokens, give the tokens and finish reasons of a loop that checks each step."""
    import runtime.engine as engine_mod
    from helpers import build_in_process

    eng = engine_mod.Engine.load(build_in_process(tiny_llama, tmp_path, "precision=fp32", "validate.enabled=false"),
                                 device="cpu")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3]]
    free = eng.generate(prompts, max_new_tokens=24, ignore_eos=True)
    stops = [free[0].output_ids[4], free[1].output_ids[9], free[2].output_ids[13]]  # each row stops somewhere
    assert eng.stop_check == 1  # (CPU)
    want = eng.generate(prompts, max_new_tokens=40, stop_token_ids=stops)
    eng.stop_check = check_every
    got = eng.generate(prompts, max_new_tokens=40, stop_token_ids=stops)
    assert [(g.output_ids, g.finish_reason) for g in got] == [(g.output_ids, g.finish_reason) for g in want]
    assert all(g.finish_reason == "stop" for g in got)
