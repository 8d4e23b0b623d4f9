"""python -m engine_factory.engines (make engines / make reproduce): which recipes this machine builds and
why not, incremental builds, and the checks of a recipe's expect: block (hash, rank sha256, validation
bounds), run on copies of recipes in a temporary recipes folder (--recipes_dir, i.e. EF_RECIPES_DIR)."""
from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import yaml

from engine_factory import config
from engine_factory.engines import BOUNDS
from engine_factory.engines.reproduce import rewrite_expect
from engine_factory.paths import recipe_names, recipes_dir
from helpers import engines_in, run_module

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DUMMY = """\
# A tiny LLaMA with dummy weights: builds in seconds.
defaults:
  - override /precision: fp32
model:
  source: dummy
  name: tiny-dummy
  config: {architectures: [LlamaForCausalLM], model_type: llama, vocab_size: 64, hidden_size: 32,
           intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
           max_position_embeddings: 64}
limits: {max_batch_size: 2, max_input_len: 32, max_output_len: 32}
"""
# The same on 2 ranks: this machine has no GPU for either; the build's validation runs 2 local processes
TINY_DUMMY_TP2 = TINY_DUMMY.replace("  - override /precision: fp32\n", "  - override /precision: fp32\n"
                                    "  - override /parallel: tp2\n").replace("name: tiny-dummy", "name: tiny-dummy-tp2")
# GPT 530B on one rank: ~1 TB of fp16 weights, more RAM than any machine that runs these tests
HUGE_DUMMY = "defaults:\n  - override /model: gpt_530b\n  - override /validate: none\n"


def engines(*args, tmp=None, timeout: float = 600):
    """python -m engine_factory.engines args; tmp: where its temporary stores go (failed rebuilds stay)."""
    return run_module("engine_factory.engines", *args, env={"TMPDIR": str(tmp)} if tmp else None, timeout=timeout)


def _rows(out: str) -> dict[str, str]:
    """recipe -> its line in the summary table."""
    return {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}


def _copy(folder, name: str, as_name: str | None = None, edit=lambda text: text) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{as_name or name}.yaml").write_text(edit((recipes_dir() / f"{name}.yaml").read_text()))


# ---- make engines --------------------------------------------------------------------------------------
def test_engines_builds_what_this_machine_can_and_says_why_not_for_the_rest(tmp_path):
    folder, store = tmp_path / "recipes", tmp_path / "store"
    _copy(folder, "gpt2_fp16")  # hf://: no hub here (HF_HUB_OFFLINE)
    _copy(folder, "gpt175b_tp8_fp16_dummy")  # 8 ranks of 175B: not for this machine's RAM
    (folder / "tiny_dummy.yaml").write_text(TINY_DUMMY)
    (folder / "tiny_dummy_tp2.yaml").write_text(TINY_DUMMY_TP2)
    (folder / "huge_dummy.yaml").write_text(HUGE_DUMMY)
    rc, out, err = engines("--recipes_dir", folder, "--store", store)
    assert rc == 0, err[-3000:]
    rows = _rows(out)
    assert "skipped" in rows["gpt2_fp16"] and "Hugging Face hub" in rows["gpt2_fp16"]
    assert "skipped" in rows["gpt175b_tp8_fp16_dummy"] and "exceed this machine's" in rows["gpt175b_tp8_fp16_dummy"]
    assert "skipped" in rows["huge_dummy"] and re.search(r"GiB of fp16 weights .* exceed", rows["huge_dummy"])
    for name in ("tiny_dummy", "tiny_dummy_tp2"):
        assert rows[name].split()[1] == "built"
        assert re.search(r"parity recorded: max_rel_logits \S+, token_agreement 1", rows[name])
    built = engines_in(store)
    assert sorted(e.name.rsplit("-", 1)[0] for e in built) == ["tiny-dummy", "tiny-dummy-tp2"]
    tp2 = next(e for e in built if e.name.startswith("tiny-dummy-tp2-"))
    assert sorted(p.name for p in tp2.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    mtimes = lambda: {e: {p.name: p.stat().st_mtime_ns for p in e.iterdir()} for e in built}
    before = mtimes()

    rc, out, err = engines("--recipes_dir", folder, "--store", store)
    assert rc == 0, err[-3000:]
    assert _rows(out)["tiny_dummy"].split()[1:3] == _rows(out)["tiny_dummy_tp2"].split()[1:3] == ["cache", "hit"]
    assert "2 cache hit, 3 skipped" in out
    assert engines_in(store) == built and mtimes() == before


def test_a_dummy_whose_validation_reference_does_not_fit_ram_is_skipped(monkeypatch, tmp_path):
    from engine_factory import engines as mod
    from engine_factory import resources

    monkeypatch.setattr(resources, "available_ram", lambda: 20 * 2**30)
    monkeypatch.setattr(mod, "_has_cuda", lambda: False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * 2**30))
    cfg = config.compose(["recipe=llama7b_fp16_dummy"])  # 6.7B parameters: 12.6 GiB fp16 + 25 GiB fp32 reference
    reason = mod.why_not(cfg, tmp_path)
    assert reason and "fp16 weights (6.74B parameters) and their 25.1 GiB fp32 reference" in reason
    assert "20.0 GiB of available RAM" in reason
    assert mod.why_not(config.compose(["recipe=llama7b_fp16_dummy", "validate=none"]), tmp_path) is None
    monkeypatch.setattr(resources, "available_ram", lambda: 64 * 2**30)
    assert mod.why_not(cfg, tmp_path) is None


def test_engines_fails_when_a_build_fails(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "broken.yaml").write_text(TINY_DUMMY.replace("max_batch_size: 2", "max_batch_size: 0"))
    rc, out, err = engines("--recipes_dir", folder, "--store", tmp_path / "store")
    assert rc == 1 and _rows(out)["broken"].split()[1] == "failed"
    assert "error: limits.max_batch_size=0 must be at least 1" in _rows(out)["broken"]
    assert err.strip().splitlines()[-1] == "error: 1 of 1 recipes failed: broken"


def test_unknown_recipe_is_one_line(tmp_path):
    rc, out, err = engines("--recipes", "no_such_recipe", "--store", tmp_path / "store")
    assert rc == 2 and err.strip().startswith("error: --recipes: no such recipe no_such_recipe")


# ---- the recorded expectations -------------------------------------------------------------------------
def _expect(name: str) -> dict:
    return yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text()).get("expect") or {}


@pytest.mark.parametrize("name", [n for n in recipe_names() if _expect(n)])
def test_published_expect_blocks_are_well_formed(name):
    expect = _expect(name)
    assert expect == dict(config.compose([f"recipe={name}"]).expect)  # as the builds see it
    assert set(expect) <= {"hash", "rank_sha256", "validation"}
    assert re.fullmatch(r"[0-9a-f]{64}", expect["hash"])
    assert expect["rank_sha256"] and all(re.fullmatch(r"rank\d+\.safetensors", k) and re.fullmatch(r"[0-9a-f]{64}", v)
                                         for k, v in expect["rank_sha256"].items())
    for path, bound in expect.get("validation", {}).items():
        assert path.split(".")[0] in ("parity", "task", "speed") and bound and set(bound) <= set(BOUNDS)


def test_rewrite_expect_keeps_the_rest_of_the_file():
    text = ("# a comment\ndefaults:\n  - override /model: stories260k\n"
            "expect:  # checked by make reproduce\n  hash: old\n  rank_sha256:\n    rank0.safetensors: old\n"
            "    rank1.safetensors: gone\n  validation:  # why these bounds\n    parity.token_agreement: {min: 1.0}\n"
            "limits:\n  max_batch_size: 4\n")
    new = rewrite_expect(text, "a" * 64, {"rank0.safetensors": "b" * 64})
    assert new == text.replace("hash: old", f"hash: {'a' * 64}").replace(
        "rank0.safetensors: old\n    rank1.safetensors: gone", f"rank0.safetensors: {'b' * 64}")
    assert rewrite_expect(new, "a" * 64, {"rank0.safetensors": "b" * 64}) == new
    # no block yet, and a flow-style one: written as a block at the same place
    plain = "defaults:\n  - override /model: stories260k\n"
    added = rewrite_expect(plain, "1" * 64, {"rank0.safetensors": "2" * 64})
    assert added.startswith(plain) and yaml.safe_load(added)["expect"] == {
        "hash": "1" * 64, "rank_sha256": {"rank0.safetensors": "2" * 64}}  # a digit-only digest stays a string
    flow = rewrite_expect(plain + "expect: {validation: {parity.token_agreement: {min: 0.9}}}\nlimits: {}\n",
                          "c" * 64, {"rank0.safetensors": "d" * 64})
    assert yaml.safe_load(flow) == {**yaml.safe_load(plain), "limits": {}, "expect": {
        "hash": "c" * 64, "rank_sha256": {"rank0.safetensors": "d" * 64},
        "validation": {"parity.token_agreement": {"min": 0.9}}}}


@pytest.fixture(scope="module")
def stories_expect(need_shared):
    need_shared("models/stories260K")
    return _expect("stories260k_fp32")


def test_reproduce_passes_on_the_recorded_recipe(tmp_path, stories_expect):
    folder = tmp_path / "recipes"
    _copy(folder, "stories260k_fp32")
    rc, out, err = engines("--reproduce", "--recipes_dir", folder, tmp=tmp_path)
    assert rc == 0, out + err[-3000:]
    assert f"ok    stories260k_fp32  hash: {stories_expect['hash'][:16]}" in out
    assert "ok    stories260k_fp32  sha256 rank0.safetensors" in out
    assert "ok    stories260k_fp32  parity.greedy_identical: True (eq True)" in out
    assert "FAIL" not in out and "1 ok" in out


@pytest.fixture(scope="module")
def broken_reproduce(tmp_path_factory, stories_expect):
    """One reproduce run over two copies of stories260k_fp32: one with an altered recorded hash, one with a
    validation bound that the engine cannot meet."""
    folder = tmp_path_factory.mktemp("recipes")
    good = stories_expect["hash"]
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    _copy(folder, "stories260k_fp32", "stories_bad_hash", lambda t: t.replace(good, bad))
    _copy(folder, "stories260k_fp32", "stories_bad_bound",
          lambda t: t.replace("parity.max_rel_logits: {max: 7.0e-06}", "parity.max_rel_logits: {max: 1.0e-12}"))
    assert (folder / "stories_bad_bound.yaml").read_text() != (recipes_dir() / "stories260k_fp32.yaml").read_text()
    rc, out, err = engines("--reproduce", "--recipes_dir", folder, tmp=tmp_path_factory.mktemp("tmp"))
    return {"rc": rc, "out": out, "err": err, "good": good, "bad": bad}


def test_reproduce_fails_when_a_recorded_hash_differs(broken_reproduce):
    r = broken_reproduce
    assert r["rc"] == 1
    assert f"FAIL  stories_bad_hash  hash: recorded {r['bad']}, rebuilt {r['good']}" in r["out"]
    assert "ok    stories_bad_hash  sha256 rank0.safetensors" in r["out"]  # only the hash line was altered
    assert "stories_bad_hash: the rebuilt engine's bytes differ from the recorded ones (hash)" in r["err"]
    assert "`python -m engine_factory.engines --record --recipes stories_bad_hash`" in r["err"]
    assert r["err"].strip().splitlines()[-1] == "error: 2 of 2 recipes failed: stories_bad_bound, stories_bad_hash"


def test_reproduce_fails_when_a_validation_bound_is_missed(broken_reproduce):
    r = broken_reproduce
    # the build itself applies expect.validation: the engine never enters the store, its report is read
    assert "FAIL  stories_bad_bound  validate: the build refused the engine" in r["out"]
    assert "stories_bad_bound  hash" not in r["out"]
    assert re.search(r"FAIL  stories_bad_bound  parity\.max_rel_logits: \S+ MISSES the recorded bound max 1e-12",
                     r["out"])
    assert "stories_bad_bound: validation misses the recipe's expect.validation (validate, " \
           "parity.max_rel_logits)" in r["err"]


def test_record_writes_the_hash_and_keeps_the_comments(tmp_path, stories_expect):
    folder = tmp_path / "recipes"
    original = (recipes_dir() / "stories260k_fp32.yaml").read_text()
    unrecorded = re.sub(r"  hash: .*\n  rank_sha256:\n    rank0.safetensors: .*\n", "", original)
    assert "hash:" not in unrecorded and "# measured:" in unrecorded
    _copy(folder, "stories260k_fp32", edit=lambda t: unrecorded)
    rc, out, err = engines("--reproduce", "--recipes", "stories260k_fp32", "--recipes_dir", folder)
    assert rc == 2 and "record no expect.hash" in err
    rc, out, err = engines("--record", "--recipes", "stories260k_fp32", "--recipes_dir", folder, tmp=tmp_path)
    assert rc == 0, out + err[-3000:]
    assert (folder / "stories260k_fp32.yaml").read_text() == original  # same bytes, same place, comments kept
    assert "recorded hash" in out
