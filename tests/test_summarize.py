"""python -m runtime.summarize: ROUGE against a hand computation, prompts that fit, engine vs transformers
end to end on a tiny LLaMA (identical greedy text, so identical scores), and one-line failures."""
from __future__ import annotations

import json

import pytest

from helpers import build_in_process, run_module
from runtime import Engine
from runtime.summarize import TLDR, main, prompt_ids, rouge_scores

pytestmark = pytest.mark.usefixtures("one_thread")

ARTICLES = [
    {"id": "a", "article": "The city council met on Monday . It approved a new park near the river , "
                           "and the mayor said work would start in spring . Residents do n't expect delays .",
     "highlights": "Council approved a new park . Work starts in spring ."},
    {"id": "b", "article": "A small dog was found in a well after three days . Firefighters used a rope "
                           "to lift it out . " * 4,  # longer than the tiny engine's 64-token prompts
     "highlights": "Dog rescued from a well . Firefighters used a rope ."},
    {"id": "c", "article": "Prices rose again in March .", "highlights": "Prices rose ."},
]


@pytest.fixture(scope="module")
def engine_dir(tiny_llama, tmp_path_factory):
    return build_in_process(tiny_llama, tmp_path_factory.mktemp("sum-store"), "precision=fp32",
                            "validate.enabled=false")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("sum-data") / "three.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_rouge_matches_a_hand_computation():
    preds = ["the cat sat", "Dogs chase cars. Cats eat fish."]
    refs = ["the cat ran away", "cat eat fish . dog chase car ."]
    # pair 1: 2 of 3 predicted unigrams in the 4 reference ones: P 2/3, R 2/4, F = 2PR/(P+R) = 4/7;
    # bigrams: "the cat" of 2 and 3: F = 2/5; LCS "the cat" = 2 tokens: F = 4/7; one sentence: Lsum = L.
    # pair 2 (stemmed, lower-cased: dog chase car cat eat fish / cat eat fish dog chase car): all 6
    # unigrams match: 1; 4 of 5 bigrams (not "car cat" / "fish dog"): 4/5; LCS 3 of 6: 1/2; sentence by
    # sentence every sentence is matched whole: Lsum 1.
    want = {"rouge1": (4 / 7 + 1) / 2, "rouge2": (2 / 5 + 4 / 5) / 2, "rougeL": (4 / 7 + 1 / 2) / 2,
            "rougeLsum": (4 / 7 + 1) / 2}
    got = rouge_scores(preds, refs)
    assert got == pytest.approx({k: 100 * v for k, v in want.items()}, abs=1e-9)
    assert rouge_scores(["same words here"], ["same words here"]) == pytest.approx(dict.fromkeys(want, 100.0))


def test_prompts_fit_and_keep_their_instruction(engine_dir, llama_tokenizer_dir):
    engine = Engine.load(engine_dir, device="cpu", tokenizer_dir=llama_tokenizer_dir)
    short, long = ARTICLES[2]["article"], ARTICLES[1]["article"]
    assert prompt_ids(engine, short, "tldr", 64) == engine.encode(short + TLDR)
    ids = prompt_ids(engine, long, "tldr", 40)
    assert 30 < len(ids) <= 40 and engine.decode_text(ids).endswith("TL;DR:")  # the article's tail went
    engine.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                                      "{% endfor %}<assistant>")
    ids = prompt_ids(engine, long, "chat", 72)  # ~50 tokens of template: 512 pieces
    text = engine.decode_text(ids)
    assert 60 < len(ids) <= 72 and text.startswith("<user>Summarize") and text.endswith("<assistant>")


def test_engine_and_transformers_end_to_end(engine_dir, tiny_llama, llama_tokenizer_dir, dataset, tmp_path):
    out = tmp_path / "summaries.json"
    rc, stdout, err = run_module("runtime.summarize", "--engine_dir", engine_dir, "--tokenizer_dir",
                                 llama_tokenizer_dir, "--hf_model_dir", tiny_llama, "--dataset", dataset,
                                 "--max_articles", 3, "--batch_size", 2, "--output_len", 8, "--device", "cpu",
                                 "--test_engine", "--test_hf", "--json_out", out, timeout=600)
    assert rc == 0, err[-3000:]
    scores = json.loads(stdout.strip().splitlines()[-1])
    assert set(scores) == {"engine", "hf"}
    for system in scores.values():
        assert set(system) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert all(0.0 <= v <= 100.0 for v in system.values())
    record = json.loads(out.read_text())
    assert record["settings"]["prompt_style"] == "tldr"  # the SentencePiece tokenizer has no template
    texts = [a["engine"] for a in record["articles"]]
    assert any(texts) and texts == [a["hf"] for a in record["articles"]]
    assert scores["engine"] == scores["hf"]  # fp32 greedy: the same tokens, so the same text and scores
    assert "rougeLsum" in err and "engine" in err  # the table


def test_check_accuracy_fails_below_the_threshold(engine_dir, llama_tokenizer_dir, dataset, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--engine_dir", str(engine_dir), "--tokenizer_dir", str(llama_tokenizer_dir), "--dataset",
              str(dataset), "--max_articles", "2", "--output_len", "4", "--device", "cpu", "--verify", "size",
              "--check_accuracy", "--rouge1_threshold", "101"])
    assert e.value.code != 0
    out, err = capsys.readouterr()
    assert "101" in _one_error_line(err) and "engine" in _one_error_line(err)
    assert set(json.loads(out.strip().splitlines()[-1])) == {"engine"}  # the scores are still printed


@pytest.mark.parametrize("dataset_arg", ["missing.jsonl", "no_such_org/no_such_dataset"])
def test_unreadable_dataset_is_one_line(engine_dir, dataset_arg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--engine_dir", str(engine_dir), "--dataset", dataset_arg])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert dataset_arg in line and "JSONL" in line


def test_missing_hf_model_is_one_line(engine_dir, llama_tokenizer_dir, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--engine_dir", str(engine_dir), "--tokenizer_dir", str(llama_tokenizer_dir), "--dataset",
              str(dataset), "--test_engine", "--test_hf", "--hf_model_dir", str(tmp_path / "nope")])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "nope" in _one_error_line(err) and "--hf_model_dir" in _one_error_line(err)
    assert out == ""  # failed before generating anything
