"""The build pipeline through its command line: the engine folder, the cache, reproducibility, sources
without a tokenizer or in .bin form, config printing and checking, sweeps and dummy weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from engine_factory import config, families
from engine_factory.checks import check_config, check_model
from engine_factory.paths import recipe_names, recipes_dir
from helpers import LIMITS, engine_path, engines_in, hf_greedy, hf_model, rank_digests, run_module, sha256

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DUMMY = ("+model.config={architectures:[LlamaForCausalLM],model_type:llama,vocab_size:64,hidden_size:32,"
              "intermediate_size:64,num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,"
              "max_position_embeddings:64}")


@pytest.fixture(scope="module")
def first_build(tmp_path_factory, tiny_llama):
    """One fp32 CLI build of the tiny LLaMA, run from a scratch directory with a relative store."""
    cwd = tmp_path_factory.mktemp("first-build")
    args = [f"model.source={tiny_llama}", "precision=fp32", "store=store", *LIMITS]
    result = run_module("engine_factory", *args, cwd=cwd)
    return {"cwd": cwd, "args": args, "result": result, "engine": engine_path(result)}


def test_build_prints_the_engine_path_last_and_writes_a_complete_engine(first_build, tiny_llama):
    engine = first_build["engine"]
    assert engine.parent == first_build["cwd"] / "store"
    assert sorted(p.name for p in engine.iterdir()) == [
        "engine.json", "manifest.json", "rank0.safetensors", "report.md", "validation.json"]  # no tokenizer in the source
    manifest = json.loads((engine / "manifest.json").read_text())
    assert set(manifest["files"]) == {"engine.json", "rank0.safetensors"}
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(engine / rel), "size": (engine / rel).stat().st_size}
    info = json.loads((engine / "engine.json").read_text())
    assert engine.name == f"tiny-llama-{info['hash'][:12]}"
    assert info["dtype"] == "float32" and info["mapping"]["tp"] == 1
    assert (info["spec"]["num_heads"], info["spec"]["num_kv_heads"]) == (8, 2)
    assert info["spec"]["rope_theta"] == 50000.0
    assert info["source"]["files"] == {p.name: sha256(p) for p in tiny_llama.iterdir()
                                       if p.name in ("config.json", "model.safetensors")}
    parity = json.loads((engine / "validation.json").read_text())
    assert parity["passed"] and parity["parity"]["passed"]
    assert parity["parity"]["max_abs_logits"] <= 1e-4 and parity["parity"]["greedy_identical"]


def test_second_identical_run_is_a_cache_hit(first_build):
    engine = first_build["engine"]
    before = {p.name: p.stat().st_mtime_ns for p in engine.iterdir()}
    rc, out, err = result = run_module("engine_factory", *first_build["args"], cwd=first_build["cwd"])
    assert engine_path(result) == engine
    assert "cache hit" in err
    assert "build rank0" not in err and "validate: parity" not in err  # neither rebuilt nor revalidated
    assert {p.name: p.stat().st_mtime_ns for p in engine.iterdir()} == before


def test_rebuilds_are_bit_identical(first_build, tiny_llama, cli, tmp_path):
    store = tmp_path / "other-store"  # no caches shared with the first build
    args = [f"model.source={tiny_llama}", "precision=fp32", f"store={store}", *LIMITS]
    engine = engine_path(cli(*args))
    assert engine.name == first_build["engine"].name  # the hash does not depend on where the store is
    assert rank_digests(engine) == rank_digests(first_build["engine"])
    manifest = (engine / "manifest.json").read_text()
    shutil.rmtree(engine)
    again = engine_path(cli(*args))
    assert again == engine
    assert (again / "manifest.json").read_text() == manifest  # every file, engine.json included


def test_engine_without_tokenizer_runs_with_tokenizer_dir(first_build, tiny_llama, llama_tokenizer_dir,
                                                          need_shared, run_engine):
    import sentencepiece
    from transformers import AutoTokenizer

    engine = first_build["engine"]
    assert not (engine / "tokenizer").exists()
    text = "Once upon a time"
    rc, out, err = run_engine("--engine_dir", engine, "--tokenizer_dir", llama_tokenizer_dir, "--input_text",
                              text, "--max_output_len", 16, "--ignore_eos", "--json")
    assert rc == 0, err
    got = json.loads(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(need_shared("models/stories260K/tokenizer.model")))
    assert got["prompt_ids"] == [1] + sp.encode(text)  # LLaMA prompts start with BOS
    assert got["output_ids"] == hf_greedy(hf_model(tiny_llama), got["prompt_ids"], 16)
    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    assert got["output_text"] == tok.decode(got["output_ids"], skip_special_tokens=True)


def test_bin_checkpoint_builds_the_same_weights(first_build, tiny_llama, cli, store, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "tiny-llama-bin"
    src.mkdir()
    shutil.copy(tiny_llama / "config.json", src)
    # transformers 5 dropped save_pretrained(safe_serialization=False): write the .bin as it used to
    torch.save(load_file(str(tiny_llama / "model.safetensors")), src / "pytorch_model.bin")
    engine = engine_path(cli(f"model.source={src}", "precision=fp32", f"store={store}", *LIMITS))
    info = json.loads((engine / "engine.json").read_text())
    assert set(info["source"]["files"]) == {"config.json", "pytorch_model.bin"}
    assert json.loads((engine / "validation.json").read_text())["parity"]["passed"]
    assert rank_digests(engine) == rank_digests(first_build["engine"])


def _contains(full, part, where=""):
    """Every key of `part` is in `full` with the same value (recursively)."""
    for k, v in part.items():
        assert k in full, f"{where}{k} missing"
        if isinstance(v, dict):
            _contains(full[k], v, f"{where}{k}.")
        else:
            assert full[k] == v, f"{where}{k}: {full[k]!r} != {v!r}"


def _recipe_values(name: str) -> dict:
    """What a recipe file sets itself, besides its defaults list."""
    data = yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text())
    data.pop("defaults", None)
    return data


def test_cfg_job_prints_the_resolved_recipe(cli, store):
    rc, out, err = cli("--cfg", "job", "recipe=stories260k_fp32", f"store={store}")
    assert rc == 0, err
    printed = yaml.safe_load(out)
    _contains(printed, _recipe_values("stories260k_fp32"))
    assert printed["precision"]["dtype"] == "fp32"
    assert printed["model"]["name"] == "stories260k"
    assert printed["store"] == str(store)
    assert not store.exists()  # printing the config builds nothing


@pytest.mark.parametrize("name", recipe_names())
def test_every_published_recipe_composes_and_passes_the_checks(name):
    cfg = config.compose([f"recipe={name}"])
    check_config(cfg)
    _contains(OmegaConf.to_container(cfg), _recipe_values(name))
    if cfg.model.config:  # the architecture is in the recipe: check the model-shape rules too
        hf = OmegaConf.to_container(cfg.model.config)
        check_model(cfg, families.resolve(hf, cfg.model.family).spec(hf, cfg.model.version))


def test_multirun_builds_one_engine_per_point(tiny_llama, cli, store):
    rc, out, err = cli("-m", "precision=fp32,fp16", f"model.source={tiny_llama}", f"store={store}", *LIMITS)
    assert rc == 0, err[-3000:]
    printed = [line[len("engine: "):] for line in out.splitlines() if line.startswith("engine: ")]
    engines = engines_in(store)
    assert sorted(printed) == sorted(map(str, engines)) and len(engines) == 2
    dtypes = sorted(json.loads((e / "engine.json").read_text())["dtype"] for e in engines)
    assert dtypes == ["float16", "float32"]
    for e in engines:
        assert (e / "manifest.json").is_file()
        assert json.loads((e / "validation.json").read_text())["parity"]["passed"]


def test_llama7b_dummy_recipe_composes():
    cfg = config.compose(["recipe=llama7b_fp16_dummy"])
    assert cfg.model.source == "dummy" and cfg.precision.dtype == "fp16" and cfg.validate.enabled
    assert cfg.model.config.hidden_size == 4096 and cfg.model.config.num_hidden_layers == 32


def test_dummy_builds_are_deterministic(cli, tmp_path):
    args = ["model.source=dummy", TINY_DUMMY, "validate.enabled=false", "precision=fp32", *LIMITS]
    a = engine_path(cli(*args, f"store={tmp_path / 'a'}"))
    b = engine_path(cli(*args, f"store={tmp_path / 'b'}"))
    assert a.name == b.name and rank_digests(a) == rank_digests(b)
    c = engine_path(cli(*args, "model.seed=1", f"store={tmp_path / 'a'}"))
    assert c != a and rank_digests(c) != rank_digests(a)  # the seed is part of the weights and the hash
    from runtime import Engine

    engine = Engine.load(a, device="cpu")
    assert engine.spec.hidden_size == 32 and engine.spec.num_kv_heads == 2
    (g,) = engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
    assert len(g.output_ids) == 4



def test_dummy_values_are_integer_steps_and_independent_of_threads(monkeypatch):
    import math

    from engine_factory.sources import dummy

    n = 3 * dummy.CHUNK + 5  # several chunks and a short last one
    many = dummy._uniform("0:layers.0.w", n)
    monkeypatch.setattr(dummy.os, "cpu_count", lambda: 1)
    assert torch.equal(dummy._uniform("0:layers.0.w", n), many)
    step = dummy.STD * math.sqrt(3) / 2**23
    k = (many.double() / step).round()
    assert torch.equal(torch.mul(k.float(), step), many) and k.abs().max() <= 2**23  # 24-bit ints x one constant
    assert abs(float(many.std()) - dummy.STD) < 1e-4 and abs(float(many.mean())) < 1e-4
    assert dummy._uniform("0:layers.0.w", 0).numel() == 0
    with torch.inference_mode():  # as calibrate reads a dummy source (the pool's threads are not in this mode)
        assert torch.equal(dummy._uniform("0:layers.0.w", n), many)
    assert not torch.equal(dummy._uniform("1:layers.0.w", 64), many[:64])  # the seed matters
