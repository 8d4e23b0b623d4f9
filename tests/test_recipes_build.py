"""One published recipe of each family builds end to end through the public command, shrunk with the
seeds' dummy-weight overrides (model.source=dummy + a few layers and a small width): the recipe's model
config, family and precision are exercised; only the size changes. Where transformers implements the
architecture, the dummy weights are a checkpoint in its layout and validation compares the engine with
transformers running them (parity); the engine then generates.

Every multi-rank recipe (tp * pp > 1) builds too, shrunk alike, in two multirun processes; where its family
has a transformers class, its validation starts the ranks as local gloo processes and compares them with
transformers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from engine_factory.paths import conf_dir, recipe_names, recipes_dir
from helpers import LIMITS, engine_path, run_module
from runtime import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

# recipe -> overrides that make it tiny, in the family's own config.json field names
SHRINK = {
    "gpt2medium_tp1_fp16": ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=4",
                            "model.config.vocab_size=512"],
    "bloom560m_tp1_fp16": ["model.config.n_layer=2", "model.config.n_embed=96", "model.config.num_attention_heads=6",
                           "model.config.vocab_size=512"],
    "santacoder_tp4_fp16": ["parallel=tp1", "model.config.n_layer=2", "model.config.n_embd=64",
                            "model.config.n_head=4", "model.config.n_inner=128", "model.config.vocab_size=512"],
    "llama7b_tp1_bf16": ["model.config.num_hidden_layers=2", "model.config.hidden_size=64",
                         "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
                         "model.config.num_key_value_heads=4", "model.config.vocab_size=512"],
    # issue 9's one command: a tp2 recipe builds and validates against transformers on 2 local ranks
    "llama7b_tp2_fp16": ["model.config.num_hidden_layers=2", "model.config.hidden_size=64",
                         "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
                         "model.config.num_key_value_heads=4", "model.config.vocab_size=512"],
    "internlm7b_tp1_fp16": ["model.config.num_hidden_layers=2", "model.config.hidden_size=64",
                            "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
                            "model.config.vocab_size=512"],
    "baichuanv2_13b_tp1_fp16": ["model.config.num_hidden_layers=2", "model.config.hidden_size=96",
                                "model.config.intermediate_size=128", "model.config.num_attention_heads=6",
                                "model.config.vocab_size=512", "model.version=v2_13b"],
    "gptnext2b_tp1_bf16": ["model.config.num_layers=2", "model.config.hidden_size=64",
                           "model.config.ffn_hidden_size=128", "model.config.num_attention_heads=4",
                           "model.config.vocab_size=512"],
}
NO_TRANSFORMERS_CLASS = {"internlm", "baichuan", "gpt_next"}


@pytest.mark.parametrize("recipe", sorted(SHRINK))
def test_recipe_of_each_family_builds_with_dummy_weights(cli, store, recipe):
    result = cli(f"recipe={recipe}", "model.source=dummy", f"store={store}", *LIMITS, *SHRINK[recipe])
    engine_dir = engine_path(result)
    meta = json.loads((engine_dir / "engine.json").read_text())
    assert meta["recipe"] == recipe and meta["source"]["type"] == "dummy"
    family = meta["family"]
    assert recipe.startswith({"gpt2": "gpt2", "gpt_bigcode": "santacoder", "gpt_next": "gptnext"}.get(family, family))
    parity = json.loads((engine_dir / "validation.json").read_text())["parity"]
    if family in NO_TRANSFORMERS_CLASS:
        assert "which transformers does not implement" in parity["skipped"]
    else:  # the recipe's dtype against transformers fp32 on the same weights
        assert parity["passed"] and parity["max_rel_logits"] < 2e-2 and parity["token_agreement"] >= 0.9
    engine = Engine.load(engine_dir, device="cpu")
    try:
        out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, ignore_eos=True)
    finally:
        engine.close()
    assert [len(g.output_ids) for g in out] == [4, 4]


# ---- every multi-rank recipe ------------------------------------------------------------------------------
def _defaults(text: str) -> dict[str, str]:
    """A recipe's `- override /group: option` lines: {group: option}."""
    return dict(re.findall(r"^\s*-\s*override\s+/(\w+):\s*(\S+)", text, re.M))


def _multi_rank_recipes() -> dict[str, int]:
    """recipe -> world size (tp * pp) of the published recipes of more than one rank, from their files (cheap
    at collection; the fixture checks it against the composed config)."""
    out = {}
    for name in recipe_names():
        text = (recipes_dir() / f"{name}.yaml").read_text()
        option = _defaults(text).get("parallel", "tp1")
        par = {**yaml.safe_load((conf_dir() / "parallel" / f"{option}.yaml").read_text()),
               **(yaml.safe_load(text).get("parallel") or {})}
        if par.get("tp", 1) * par.get("pp", 1) > 1:
            out[name] = par.get("tp", 1) * par.get("pp", 1)
    return out


MULTI_RANK = _multi_rank_recipes()
# One shrink for every family: 2 layers, width 128, 16 heads (tp16 divides them), 8 KV heads where the family
# has them (LLaMA, InternLM: GQA, one KV head per rank at tp8 as LLaMA-2 70B's), MLP 128, vocab 512. Each field in
# every family's spelling (LLaMA, GPT-2 / BigCode, BLOOM's two), equal values, so one set fits all: a config
# class ignores the spellings it does not read, and maps its aliases to the same number.
SHRINK_ALL = ["model.source=dummy", *LIMITS, "++model.config.vocab_size=512",
              "++model.config.num_hidden_layers=2", "++model.config.n_layer=2",
              "++model.config.hidden_size=128", "++model.config.n_embd=128", "++model.config.n_embed=128",
              "++model.config.num_attention_heads=16", "++model.config.n_head=16",
              "++model.config.num_key_value_heads=8", "++model.config.intermediate_size=128",
              "++model.config.n_inner=128"]
# Built without validation: InternLM and Baichuan have no transformers class to compare with (their parity is
# tests/test_families_internlm_baichuan.py at tp1; sharding is family-blind, tests/test_parallel.py), and
# gpt530b's 16 local gloo ranks on a 2-core machine take ~30 s for what the tp8 GPT-2 recipe already shows.
def _validated(name: str, family: str) -> bool:
    return family not in NO_TRANSFORMERS_CLASS and MULTI_RANK[name] <= 8


def _family(name: str) -> str:
    model = _defaults((recipes_dir() / f"{name}.yaml").read_text())["model"]
    return yaml.safe_load((conf_dir() / "model" / f"{model}.yaml").read_text())["config"]["model_type"]


@pytest.fixture(scope="module")
def multi_rank_builds(tmp_path_factory) -> dict[str, dict]:
    """Every multi-rank recipe, shrunk, built in two sweeps (one process each: validated, built only);
    recipe -> its job.json."""
    from engine_factory import config

    for name, world in MULTI_RANK.items():
        cfg = config.compose([f"recipe={name}"])
        assert cfg.parallel.tp * cfg.parallel.pp == world and cfg.model.config.model_type == _family(name)
    groups = {"validate=parity": [n for n in MULTI_RANK if _validated(n, _family(n))]}
    groups["validate=none"] = [n for n in MULTI_RANK if n not in groups["validate=parity"]]
    cwd = tmp_path_factory.mktemp("multi-rank")
    store = cwd / "store"
    for validate, names in groups.items():
        rc, out, err = run_module("engine_factory", "-m", f"recipe={','.join(names)}", validate, f"store={store}",
                                  *SHRINK_ALL, cwd=cwd, timeout=900)
        assert rc == 0, err[-3000:]
    jobs = [json.loads(p.read_text()) for p in store.glob("sweeps/*/*/job.json")]
    return {j["recipe"]: j for j in jobs}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(MULTI_RANK))
def test_every_multi_rank_recipe_builds_shrunk(multi_rank_builds, recipe):
    job = multi_rank_builds[recipe]
    assert job["status"] == "ok", job["error"]
    engine = Path(job["engine"])
    meta = json.loads((engine / "engine.json").read_text())
    n = MULTI_RANK[recipe]
    assert meta["mapping"]["world_size"] == n and (engine / "manifest.json").is_file()
    assert sorted(p.name for p in engine.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(n))
    if _validated(recipe, meta["family"]):  # the recipe's dtype on n local ranks against transformers fp32
        parity = job["validation"]["parity"]
        assert parity["passed"] and parity["max_rel_logits"] < 2e-2 and parity["token_agreement"] >= 0.9, parity
    else:
        assert job["validation"] is None and not (engine / "validation.json").exists()
    if meta["mapping"]["pp"] > 1:  # each stage's rank files hold only its layers
        from safetensors import safe_open

        tp = meta["mapping"]["tp"]
        for r in range(n):
            with safe_open(str(engine / f"rank{r}.safetensors"), "pt") as f:
                layers = {k.split(".")[1] for k in f.keys() if k.startswith("layers.")}
            assert layers == {str(r // tp)}, (r, layers)
