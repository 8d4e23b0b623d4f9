"""Hostile and faulty runtime inputs (issue 8): every bad flag of runtime.run / bench / summarize and every
bad argument of Engine.generate / Engine.score ends in one line naming the input and its valid range
(exit code 2 from a shell, runtime.errors.UserError from Python), never a traceback or a silent run.

The command-line table runs each row's `main(argv)` in this process (a row costs milliseconds, not a
Python start); test_cli_process runs a few rows as real processes through run_engine, argv bytes that are
not UTF-8 included. The property tests throw hypothesis' values at the same checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import assert_one_clear_line, build_in_process
from runtime import Engine, UserError
from runtime import bench as bench_cli
from runtime import run as run_cli
from runtime import summarize as summarize_cli
from runtime.engine import resolve_device
from runtime.format import TOKENIZER_DIR
from runtime.params import check_sampling
from runtime.sampling import sample

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_VOCAB, GPT2_VOCAB, MAX_SEQ = 512, 50257, 128  # the tiny checkpoints, helpers.LIMITS (64 + 64)
CLIS = {"run": run_cli.main, "bench": bench_cli.main, "summarize": summarize_cli.main}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_llama):
    """The tiny LLaMA in fp32, no tokenizer."""
    return build_in_process(tiny_llama, tmp_path_factory.mktemp("hostile-store"), "precision=fp32",
                            "validate.enabled=false")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_gpt2):
    """The tiny GPT-2 in fp32 with the real GPT-2 tokenizer (skips where the shared folder lacks it)."""
    engine_dir = build_in_process(tiny_gpt2, tmp_path_factory.mktemp("hostile-store-gpt2"), "precision=fp32",
                                  "validate.enabled=false")
    if not (engine_dir / TOKENIZER_DIR).is_dir():
        pytest.skip("the GPT-2 tokenizer is absent (set EF_SHARED_DIR to the shared data folder)")
    return engine_dir


@pytest.fixture(scope="module")
def llama(llama_dir):
    return Engine.load(llama_dir, device="cpu")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return Engine.load(gpt2_dir, device="cpu")


def _in_process(capsys, cli: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of CLIS[cli](argv); any exception but SystemExit fails the test."""
    try:
        CLIS[cli]([str(a) for a in argv])
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the command lines: (case, cli, engine, argv, exit code, words of the one error line) ---------------
ROWS = [
    # runtime.run: generation flags, checked before the engine loads
    ("max_output_len-negative", "run", "llama", ["--max_output_len", "-5"], 2, ["--max_output_len -5", ">= 1"]),
    ("max_output_len-zero", "run", "llama", ["--max_output_len", "0"], 2, ["--max_output_len 0", ">= 1"]),
    ("max_output_len-float", "run", "llama", ["--max_output_len", "1e3"], 2, ["--max_output_len 1e3", "integer"]),
    ("max_output_len-huge", "run", "llama", ["--max_output_len", str(10**30)], 2,
     ["--input_ids", "max_seq_len 128", "--max_output_len", "at most 125"]),
    ("max_output_len-just-over", "run", "llama", ["--max_output_len", str(MAX_SEQ - 2)], 2,
     ["3 tokens + 126 new", "at most 125"]),
    ("top_p-zero", "run", "llama", ["--top_p", "0"], 2, ["--top_p 0", "(0, 1]"]),
    ("top_p-negative", "run", "llama", ["--top_p", "-1"], 2, ["--top_p -1", "(0, 1]"]),
    ("top_p-over-one", "run", "llama", ["--top_p", "1.5"], 2, ["--top_p 1.5", "(0, 1]"]),
    ("top_p-nan", "run", "llama", ["--top_p", "nan"], 2, ["--top_p nan", "(0, 1]"]),
    ("top_k-negative", "run", "llama", ["--top_k", "-3"], 2, ["--top_k -3", ">= 0"]),
    ("top_k-fraction", "run", "llama", ["--top_k", "1.5"], 2, ["--top_k 1.5", "integer >= 0"]),
    ("top_k-word", "run", "llama", ["--top_k", "ten"], 2, ["--top_k ten", "integer >= 0"]),
    ("top_k-missing-value", "run", "llama", ["--top_k"], 2, ["--top_k", "expected one argument"]),
    ("temperature-nan", "run", "llama", ["--temperature", "nan"], 2, ["--temperature nan", "finite", ">= 0"]),
    ("temperature-inf", "run", "llama", ["--temperature", "inf"], 2, ["--temperature inf", "finite"]),
    ("temperature-minus-inf", "run", "llama", ["--temperature=-inf"], 2, ["--temperature -inf", "finite"]),
    ("temperature-negative", "run", "llama", ["--temperature", "-1"], 2, ["--temperature -1", ">= 0"]),
    ("temperature-word", "run", "llama", ["--temperature", "hot"], 2, ["--temperature hot", "finite"]),
    ("seed-negative", "run", "llama", ["--seed", "-1"], 2, ["--seed -1", "integer in 0.."]),
    ("seed-over-64-bits", "run", "llama", ["--seed", str(2**64)], 2, ["--seed 18446744073709551616", "0.."]),
    ("seed-fraction", "run", "llama", ["--seed", "0.5"], 2, ["--seed 0.5", "integer"]),
    ("device-tpu", "run", "llama", ["--device", "tpu"], 2, ["--device tpu", "auto, cpu, cuda or cuda:N"]),
    ("device-empty", "run", "llama", ["--device", ""], 2, ["--device", "auto, cpu, cuda or cuda:N"]),
    ("device-negative-index", "run", "llama", ["--device", "cuda:-1"], 2, ["--device cuda:-1", "cuda:N"]),
    ("device-no-such-gpu", "run", "llama", ["--device", "cuda:99"], 2, ["--device cuda:99", "GPU"]),
    ("input_ids-word", "run", "llama", ["--input_ids", "1,abc"], 2, ["--input_ids 1,abc", "'abc'", "1,2,3"]),
    ("input_ids-empty", "run", "llama", ["--input_ids", ""], 2, ["--input_ids", "no token ids"]),
    ("input_ids-commas", "run", "llama", ["--input_ids", ",,"], 2, ["--input_ids", "no token ids"]),
    ("input_ids-fraction", "run", "llama", ["--input_ids", "1,2.5"], 2, ["--input_ids 1,2.5", "'2.5'"]),
    ("input_ids-negative", "run", "llama", ["--input_ids", "3,-1"], 2, ["--input_ids 3,-1", ">= 0"]),
    ("input_ids-outside-vocab", "run", "llama", ["--input_ids", "1,99999"], 2,
     ["--input_ids", "[99999]", "outside the vocabulary (0..511)"]),
    ("input_ids-second-prompt-bad", "run", "llama", ["--input_ids", "1,2", "--input_ids", "512"], 2,
     ["--input_ids", "prompt 1", "[512]"]),
    ("input_ids-and-text", "run", "llama", ["--input_ids", "1", "--input_text", "a"], 2, ["not allowed with"]),
    ("input_text-lone-surrogates", "run", "llama", ["--input_text", "ok \udcff\udcfe"], 2,
     ["--input_text", r"b'ok \xff\xfe'", "not valid UTF-8"]),
    ("input_text-no-tokenizer", "run", "llama", ["--input_text", "hello"], 2, ["--input_text", "no tokenizer"]),
    ("stop-empty", "run", "llama", ["--stop", ""], 2, ["--stop ''", "must not be empty"]),
    ("stop-not-utf8", "run", "llama", ["--stop", "\udcff"], 2, ["--stop", "not valid UTF-8"]),
    ("stop-without-tokenizer", "run", "llama", ["--stop", "."], 2,
     ["--stop needs a tokenizer", "--tokenizer_dir"]),
    ("verify-unknown", "run", "llama", ["--verify", "some"], 2, ["--verify", "invalid choice", "full"]),
    ("log_level-unknown", "run", "llama", ["--log_level", "loud"], 2, ["--log_level", "invalid choice", "DEBUG"]),
    ("unknown-flag", "run", "llama", ["--beam_width", "4"], 2, ["unrecognized arguments: --beam_width 4"]),
    ("no-engine_dir", "run", None, [], 2, ["required", "--engine_dir"]),
    # with a tokenizer: text that encodes to nothing, ids outside GPT-2's vocabulary
    ("input_text-empty", "run", "gpt2", ["--input_text", ""], 2, ["--input_text", "prompt 0 is empty"]),
    ("input_ids-outside-gpt2-vocab", "run", "gpt2", ["--input_ids", "50257"], 2,
     ["--input_ids", "[50257]", "(0..50256)"]),
    ("gpt2-stop-empty", "run", "gpt2", ["--input_text", "Hi", "--stop", ""], 2, ["--stop ''", "empty"]),
    # runtime.bench and runtime.summarize: the same rules for the flags they share
    ("bench-batch_size-zero", "bench", "llama", ["--batch_size", "0"], 2, ["--batch_size 0", ">= 1"]),
    ("bench-input_len-negative", "bench", "llama", ["--input_len", "-4"], 2, ["--input_len -4", ">= 1"]),
    ("bench-output_len-word", "bench", "llama", ["--output_len", "many"], 2, ["--output_len many", "integer"]),
    ("bench-reps-zero", "bench", "llama", ["--reps", "0"], 2, ["--reps 0", ">= 1"]),
    ("bench-device-tpu", "bench", "llama", ["--device", "tpu"], 2, ["--device tpu", "cuda:N"]),
    ("bench-over-the-limits", "bench", "llama", ["--input_len", "100", "--output_len", "100"], 2,
     ["--input_len 100 --output_len 100", "at most 64 input", "128 input + output"]),
    ("summarize-output_len-zero", "summarize", "llama", ["--dataset", "x.jsonl", "--output_len", "0"], 2,
     ["--output_len 0", ">= 1"]),
    ("summarize-max_articles-negative", "summarize", "llama", ["--dataset", "x.jsonl", "--max_articles", "-2"], 2,
     ["--max_articles -2", ">= 1"]),
    ("summarize-batch_size-float", "summarize", "llama", ["--dataset", "x.jsonl", "--batch_size", "2.0"], 2,
     ["--batch_size 2.0", "integer"]),
    ("summarize-threshold-nan", "summarize", "llama", ["--dataset", "x.jsonl", "--rouge1_threshold", "nan"], 2,
     ["--rouge1_threshold nan", "finite"]),
    ("summarize-device-tpu", "summarize", "llama", ["--dataset", "x.jsonl", "--device", "tpu"], 2,
     ["--device tpu", "cuda:N"]),
]


def _argv(request, cli: str, engine: str | None, argv: list[str]) -> list[str]:
    full = [] if engine is None else ["--engine_dir", str(request.getfixturevalue(f"{engine}_dir"))]
    full += list(argv)
    if cli == "run" and not {"--input_ids", "--input_text"} & set(argv):
        full += ["--input_ids", "1,2,3"]  # a good prompt, so that the row's own flag is what fails
    if not any(a.startswith("--device") for a in argv):
        full += ["--device", "cpu"]
    return full


@pytest.mark.parametrize("case, cli, engine, argv, rc, words", ROWS, ids=[r[0] for r in ROWS])
def test_cli_rejects(request, capsys, case, cli, engine, argv, rc, words):
    result = _in_process(capsys, cli, _argv(request, cli, engine, argv))
    assert result[0] == rc, result
    assert_one_clear_line(result, *words)


PROCESS_ROWS = ["input_text-lone-surrogates", "input_ids-outside-vocab"]  # a flag, and what only the engine knows


@pytest.mark.parametrize("case", PROCESS_ROWS)
def test_cli_process(request, run_engine, case):
    """The same rows as real `python -m runtime.run` processes; text goes in as bytes that are not UTF-8
    (Python hands them to us as lone surrogates)."""
    (_, cli, engine, argv, rc, words), = [r for r in ROWS if r[0] == case]
    args = [a.encode("utf-8", "surrogateescape") for a in _argv(request, cli, engine, argv)]  # as a shell would
    result = run_engine(*args)
    assert result[0] == rc, result
    assert_one_clear_line(result, *words)


def test_cli_boundary_values_work(request, capsys):
    """The edges of every range are accepted, and a temperature too small for float32 decodes greedily."""
    base = ["--engine_dir", str(request.getfixturevalue("llama_dir")), "--device", "cpu", "--input_ids", "5,6,7",
            "--ignore_eos"]
    greedy = _in_process(capsys, "run", base + ["--max_output_len", "6", "--temperature", "0", "--top_k", "0",
                                                "--top_p", "1"])
    tiny = _in_process(capsys, "run", base + ["--max_output_len", "6", "--temperature", "5e-324", "--top_k", "600",
                                              "--top_p", "1e-9", "--seed", str(2**63 - 1)])
    assert greedy[0] == tiny[0] == 0, (greedy, tiny)
    assert len(greedy[1].split()) == 3 + 6
    assert tiny[1] == greedy[1]
    full = _in_process(capsys, "run", base + ["--max_output_len", str(MAX_SEQ - 3)])  # fills max_seq_len
    assert full[0] == 0 and len(full[1].split()) == MAX_SEQ, full


# ---- Python callers: the same checks, as UserError ------------------------------------------------------
CALLS = [  # (case, generate's keyword arguments over a good call, words of the message)
    ("max_new_tokens-zero", {"max_new_tokens": 0}, ["max_new_tokens=0", ">= 1"]),
    ("max_new_tokens-bool", {"max_new_tokens": True}, ["max_new_tokens=True", "integer"]),
    ("max_new_tokens-str", {"max_new_tokens": "4"}, ["max_new_tokens='4'"]),
    ("temperature-nan", {"temperature": math.nan}, ["temperature=nan", "finite"]),
    ("temperature-huge-int", {"temperature": 10**400}, ["temperature=", "finite"]),
    ("top_p-zero", {"top_p": 0.0}, ["top_p=0.0", "(0, 1]"]),
    ("top_k-float", {"top_k": 2.0}, ["top_k=2.0", "integer >= 0"]),
    ("seed-negative", {"seed": -1}, ["seed=-1", "or None"]),
    ("prompts-empty-batch", {"prompts": []}, ["prompts=[]"]),
    ("prompts-empty-prompt", {"prompts": [[1], []]}, ["prompt 1 is empty"]),
    ("prompts-float-id", {"prompts": [[1, 2.0]]}, ["prompt 0", "2.0 is not a token id"]),
    ("prompts-bool-id", {"prompts": [True, 3]}, ["prompt 0", "True is not a token id"]),
    ("prompts-nested", {"prompts": [[1], [[2]]]}, ["prompt 1", "[2] is not a token id"]),
    ("prompts-junk", {"prompts": [[1], None]}, ["prompt 1 (None)"]),
    ("prompts-tensor", {"prompts": torch.tensor([1, 2])}, ["prompts=tensor"]),
    ("prompts-negative-id", {"prompts": [[-1]]}, ["prompt 0", "[-1] outside the vocabulary"]),
    ("prompts-too-long", {"prompts": [[3] * 65]}, ["65 tokens", "max_input_len"]),
    ("stop-without-tokenizer", {"stop": ["."]}, ["stop=['.']", "tokenizer"]),
    ("stop-not-strings", {"stop": [1]}, ["stop=[1]", "non-empty strings"]),
    ("stop_token_ids-float", {"stop_token_ids": [1.5]}, ["stop_token_ids", "1.5 is not a token id"]),
    ("stop_token_ids-outside", {"stop_token_ids": [512]}, ["stop_token_ids", "[512]"]),
    ("ignore_eos-str", {"ignore_eos": "no"}, ["ignore_eos='no'"]),
    ("streamer-not-callable", {"streamer": 3}, ["streamer=3"]),
]


@pytest.mark.parametrize("case, kwargs, words", CALLS, ids=[c[0] for c in CALLS])
def test_generate_rejects(llama, case, kwargs, words):
    kwargs = {"prompts": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(UserError) as e:
        llama.generate(**kwargs)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_score_and_device_reject(llama):
    with pytest.raises(UserError, match=r"prompt 1 has token ids \[512\] outside"):
        llama.score([[1, 2], [512]])
    with pytest.raises(UserError, match=r"prompt 0: 'a' is not a token id"):
        llama.score([1, "a"])
    for bad in ("tpu", "cuda:99", "", "cpu:0", None, 0):
        with pytest.raises(UserError, match="device="):
            resolve_device(bad)


def test_text_that_is_not_utf8(gpt2):
    with pytest.raises(UserError, match=r"prompt 1 is not valid UTF-8 text \(bytes b'\\xff'"):
        gpt2.generate(["fine", "bad \udcff"], max_new_tokens=1)
    with pytest.raises(UserError, match="not valid UTF-8"):
        gpt2.encode("\ud800")


# ---- properties: any value works or is one UserError line ------------------------------------------------
INTS = st.one_of(st.integers(-3, 6), st.integers(), st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63), 10**400]))
FLOATS = st.one_of(st.floats(), st.floats(0, 2), st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e300, 1.0, 1.5, -1.0,
                                                                  math.nan, math.inf, -math.inf]))
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(0, 9), max_size=2),
                 st.just(object()))
GOOD_IDS = st.lists(st.integers(0, LLAMA_VOCAB - 1), min_size=1, max_size=6)
IDS = st.lists(st.integers(-2, LLAMA_VOCAB + 2), max_size=6)
# Per argument of generate: values in the documented ranges (small max_new_tokens: each example decodes a
# few tokens only), and hostile ones (which may also hit a valid value now and then).
VALID = {
    "prompts": st.one_of(GOOD_IDS, st.lists(GOOD_IDS, min_size=1, max_size=6)),  # 6 > max_batch_size 4
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 1e300), st.sampled_from([5e-324, 1e-45, 3.5e38, 1e308])),
    "top_k": st.one_of(st.integers(0, 3), st.integers(0, 2**64)),
    "top_p": st.one_of(st.just(1.0), st.floats(5e-324, 1.0)),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, LLAMA_VOCAB - 1), max_size=3)),
    "ignore_eos": st.booleans(),
}
HOSTILE = {
    "prompts": st.one_of(IDS, st.lists(IDS, max_size=5), st.text(max_size=4),
                         st.lists(st.integers(0, LLAMA_VOCAB - 1), min_size=60, max_size=130),  # max_input_len 64
                         st.recursive(JUNK, lambda inner: st.lists(inner, max_size=3), max_leaves=6)),
    "max_new_tokens": st.one_of(INTS, FLOATS, JUNK),
    "temperature": st.one_of(FLOATS, INTS, JUNK),
    "top_k": st.one_of(INTS, FLOATS, JUNK),
    "top_p": st.one_of(FLOATS, INTS, JUNK),
    "seed": st.one_of(INTS, FLOATS, JUNK),
    "stop_token_ids": st.one_of(IDS, INTS, JUNK),
    "ignore_eos": JUNK,
}
SAMPLING = ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]
SETTINGS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _which(names: list[str]) -> list:
    """Parametrizations: no hostile argument, each one alone (every bad value met on its own), all of them."""
    return [(), *[(n,) for n in names], tuple(names)]


def _ids(cases) -> list[str]:
    return ["+".join(c) if c else "valid" for c in cases]


def _draw(data, names: list[str], hostile: set[str]) -> dict:
    return {k: data.draw((HOSTILE if k in hostile else VALID)[k], label=k) for k in names}


def _one_line(e: UserError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


def _real(v) -> float | None:
    """v as a float when it is a Python int or float that a float can hold, else None."""
    if type(v) not in (int, float):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def _documented(n, t, k, p, s) -> bool:
    """The README's ranges, written out again (independently of runtime/params.py)."""
    t, p = _real(t), _real(p)
    return (type(n) is int and n >= 1 and t is not None and math.isfinite(t) and t >= 0 and type(k) is int
            and k >= 0 and p is not None and 0 < p <= 1 and (s is None or (type(s) is int and 0 <= s < 2**63)))


@pytest.mark.parametrize("hostile", _which(SAMPLING), ids=_ids(_which(SAMPLING)))
@settings(SETTINGS, max_examples=50)
@given(data=st.data())
def test_check_sampling_property(data, hostile):
    """check_sampling accepts exactly the documented ranges; everything else is one UserError line."""
    values = [_draw(data, SAMPLING, hostile)[k] for k in SAMPLING]
    try:
        checked = check_sampling(*values)
    except UserError as e:
        _one_line(e)
        assert not _documented(*values)
        event("UserError")
        return
    assert _documented(*values)
    n, t, k, p, seed = values
    assert checked == (n, float(t), k, float(p), seed) and [type(v) for v in checked[1:4]] == [float, int, float]
    event("works")


@SETTINGS
@given(temperature=st.floats(0, 1e300) | st.sampled_from([5e-324, 1e-45, 1e-38, 3.5e38]),
       top_k=st.integers(0, 600), top_p=st.floats(5e-324, 1.0), seed=st.integers(0, 2**63 - 1))
def test_sample_property(temperature, top_k, top_p, seed):
    """Valid settings never give nan probabilities: each row's token is in range and, at top_k 1, the argmax."""
    logits = torch.randn(3, LLAMA_VOCAB, generator=torch.Generator().manual_seed(seed % 2**32)) * 30
    toks = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    assert toks.shape == (3,) and bool(((toks >= 0) & (toks < LLAMA_VOCAB)).all())
    if top_k == 1 or temperature == 0:
        assert torch.equal(toks, logits.argmax(-1))


@pytest.mark.parametrize("hostile", _which(sorted(VALID)), ids=_ids(_which(sorted(VALID))))
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_generate_property(llama, data, hostile):
    """Valid arguments always generate; any hostile one is a one-line UserError (never another exception)."""
    kw = _draw(data, sorted(VALID), hostile)
    try:
        gens = llama.generate(**kw)
    except UserError as e:
        _one_line(e)
        assert hostile, f"valid arguments refused: {e}"
        event("UserError")
        return
    assert _documented(*(kw[k] for k in SAMPLING)), "a value outside the documented ranges was accepted"
    prompts = kw["prompts"]
    assert len(gens) == (1 if isinstance(prompts[0], int) else len(prompts))
    for g in gens:
        assert 1 <= len(g.output_ids) <= kw["max_new_tokens"]
        assert all(0 <= t < LLAMA_VOCAB for t in g.output_ids)
    event("works")


@pytest.mark.parametrize("hostile", _which(["prompts", "stop"]), ids=_ids(_which(["prompts", "stop"])))
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_text_generate_property(gpt2, data, hostile):
    """Text (lone surrogates included: hypothesis draws them), stop strings and their junk, with a tokenizer."""
    valid = {"prompts": st.one_of(st.text(min_size=1, max_size=12), st.lists(st.text(min_size=1, max_size=8),
                                                                         min_size=1, max_size=3)),
             "stop": st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2))}
    hostile_of = {"prompts": HOSTILE["prompts"], "stop": st.one_of(st.text(max_size=3), JUNK, st.lists(JUNK))}
    kw = {k: data.draw((hostile_of if k in hostile else valid)[k], label=k) for k in valid}
    try:
        gens = gpt2.generate(**kw, max_new_tokens=3)
    except UserError as e:
        _one_line(e)
        event("UserError")
        return
    assert all(isinstance(g.text, str) and 1 <= len(g.output_ids) <= 3 for g in gens)
    event("works")


def test_bench_accepts_its_smallest_values(request, capsys):
    """The checks refuse nothing valid: 1 is every count's smallest value; batch 5 > max_batch_size is chunked."""
    rc, out, err = _in_process(capsys, "bench", ["--engine_dir", str(request.getfixturevalue("llama_dir")),
                                                 "--device", "cpu", "--batch_size", "1", "--batch_size", "5",
                                                 "--input_len", "1", "--output_len", "1", "--reps", "1"])
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["batch"], r["input_len"], r["output_len"]) for r in rows] == [(1, 1, 1), (5, 1, 1)]
