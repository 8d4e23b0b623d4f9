"""The validate stage: the summarize task (ROUGE, engine and reference side by side), report.md, and a
recipe's expect.validation bounds, which fail the build and keep nothing in the store."""
from __future__ import annotations

import json

import pytest

from engine_factory.bounds import check_bounds
from helpers import LIMITS, assert_store_clean, build_in_process, engine_path, engines_in

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(tmp_path):
    path = tmp_path / "articles.jsonl"
    rows = [{"article": "The cat sat on the mat . It was a sunny day in the town .", "highlights": "A cat sat ."},
            {"article": "Prices rose again this week , officials said on Monday .", "highlights": "Prices rose ."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_records_rouge_of_engine_and_reference(cli, store, need_shared, tmp_path):
    need_shared("models/stories260K")  # a real (tiny) model: its summaries share words with the references
    engine = engine_path(cli("recipe=stories260k_fp32", f"store={store}", "validate.task.articles=2",
                             f"validate.task.dataset={_dataset(tmp_path)}", "validate.task.output_len=24",
                             "validate.speed=true"))
    v = json.loads((engine / "validation.json").read_text())
    task = v["task"]
    assert task["articles"] == 2 and set(task["engine"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    # fp32 engine and transformers decode the same tokens: the same ROUGE, to the last digit
    assert task["engine"] == task["hf"] and task["rouge1_vs_reference"] == 0
    assert task["engine"]["rouge1"] > 0
    assert v["speed"]["decode_tok_s"] > 0 and v["passed"]
    report = (engine / "report.md").read_text()
    assert "| engine |" in report and "| hf |" in report and "passed" in report


def test_expect_bound_not_met_fails_the_build(cli, store, tiny_llama):
    rc, out, err = cli(f"model.source={tiny_llama}", "precision=fp32", f"store={store}", *LIMITS,
                       "+expect.validation={parity.max_rel_logits:{max:-1.0}}")
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: validation of") and "parity.max_rel_logits" in last and "max -1.0" in last
    assert not engines_in(store)
    assert_store_clean(store)


def test_check_bounds():
    v = {"parity": {"max_rel_logits": 1e-6, "greedy_identical": True}, "task": {"engine": {"rouge1": 30.0}}}
    assert check_bounds(v, {"parity.max_rel_logits": {"max": 1e-5}, "parity.greedy_identical": {"eq": True},
                            "task.engine.rouge1": {"min": 29.5}}) == []
    assert check_bounds(v, {"task.engine.rouge1": {"min": 31}}) == ["task.engine.rouge1 = 30.0 (expect min 31)"]
    assert check_bounds(v, {"task.hf.rouge1": {"min": 1}}) == ["task.hf.rouge1 = None (expect min 1)"]


def test_a_reference_that_does_not_fit_ram_is_skipped_not_loaded(monkeypatch):
    from types import SimpleNamespace

    import torch

    from engine_factory import resources
    from engine_factory.stages.validate import load_reference
    from runtime.spec import ModelSpec

    spec = ModelSpec(family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                     head_dim=0, intermediate_size=11008, max_position_embeddings=4096)
    engine = SimpleNamespace(spec=spec, device=torch.device("cpu"))
    monkeypatch.setattr(resources, "available_ram", lambda: 16 * 2**30)
    ref, why = load_reference(engine, lambda: pytest.fail("loaded a reference that cannot fit"))
    assert ref is None and "needs ~25.1 GiB of RAM and this machine has 16.0 GiB available" in why
    monkeypatch.setattr(resources, "available_ram", lambda: 64 * 2**30)
    assert load_reference(engine, lambda: "the model") == ("the model", "")


def test_cache_hit_with_new_validate_settings_validates_again_without_rebuilding(tiny_llama, tmp_path):
    """validate.* is not in the hash: other settings reuse the engine and validate it again (under the build's
    lock), recording the new settings' results."""
    store = tmp_path / "store"
    engine = build_in_process(tiny_llama, store, "precision=fp32", "validate.max_new_tokens=4")
    first = json.loads((engine / "validation.json").read_text())
    rank0 = (engine / "rank0.safetensors").stat().st_ino
    again = build_in_process(tiny_llama, store, "precision=fp32", "validate.max_new_tokens=6")
    second = json.loads((engine / "validation.json").read_text())
    assert again == engine and (engine / "rank0.safetensors").stat().st_ino == rank0  # not rebuilt
    assert second["validate_key"] != first["validate_key"]
    assert second["parity"]["token_agreement"] == 1.0
