"""One published recipe of each family builds end to end through the public command, shrunk with the
seeds' dummy-weight overrides (model.source=dummy + a few layers and a small width): the recipe's model
config, family and precision are exercised; only the size changes. Where transformers implements the
architecture, the dummy weights are a checkpoint in its layout and validation compares the engine with
transformers running them (parity); the engine then generates."""
from __future__ import annotations

import json

import pytest

from helpers import LIMITS, engine_path
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
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, ignore_eos=True)
    assert [len(g.output_ids) for g in out] == [4, 4]
