"""precision.quant_lm_head=true: the lm_head stored and run as the weight-only mode's linear (gpt-fast's int8 and
int4 quantize their output layer too; vLLM's lm_head_quantized), for untied models and tied ones (whose engine stores
the quantized embedding as an lm_head of its own and keeps the float embedding for the lookup), cut by vocabulary
rows at tp2 like the float lm_head."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_clear_line, build_in_process, hf_logits, hf_model
from runtime import Engine
from runtime.errors import EngineError
from runtime.quant import MODES

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = "precision.quant_lm_head=true"


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_llama, tiny_llama_mha):
    """int8_wo fp32 engines of the tied (GQA) and the untied (MHA) tiny LLaMA, with and without the head
    quantized; each validated by the build against transformers in fp32 with int8_wo's bounds."""
    store = tmp_path_factory.mktemp("head-store")
    out = {}
    for kind, src in (("tied", tiny_llama), ("untied", tiny_llama_mha)):
        for head in (False, True):
            out[kind, head] = build_in_process(src, store, "precision=int8_wo", "precision.dtype=fp32",
                                               f"precision.quant_lm_head={str(head).lower()}")
    return out


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_the_rank_file_holds_the_head_in_int8_dequantizing_to_the_checkpoint(engines, kind, tiny_llama,
                                                                              tiny_llama_mha):
    src = tiny_llama if kind == "tied" else tiny_llama_mha
    ckpt = load_file(str(next(src.glob("*.safetensors"))))
    want = ckpt["model.embed_tokens.weight" if kind == "tied" else "lm_head.weight"]
    engine_dir = engines[kind, True]
    meta = json.loads((engine_dir / "engine.json").read_text())
    assert meta["quant"]["lm_head"] is True and meta["spec"]["tie_word_embeddings"] is False  # its own lm_head
    assert "lm_head" not in json.loads((engines[kind, False] / "engine.json").read_text())["quant"]
    assert engines[kind, True] != engines[kind, False]  # another engine (hash)
    t = load_file(str(engine_dir / "rank0.safetensors"))
    q, scale = t["lm_head.weight"], t["lm_head.scale"]
    assert q.dtype == torch.int8 and q.shape == want.shape and scale.shape == (want.shape[0],)
    assert ((q.float() * scale[:, None] - want).abs() <= scale[:, None] * 0.5 + 1e-6).all()  # nearest level
    assert torch.equal(t["embed.weight"], ckpt["model.embed_tokens.weight"])  # the lookup stays float
    assert json.loads((engine_dir / "validation.json").read_text())["parity"]["passed"]
    sizes = [(engines[kind, h] / "rank0.safetensors").stat().st_size for h in (False, True)]
    # untied: the fp32 head (4 bytes a weight) becomes int8 (1) and a scale a row; tied: that int8 copy is added
    added = want.numel() + 4 * want.shape[0] - (4 * want.numel() if kind == "untied" else 0)
    assert abs(sizes[1] - sizes[0] - added) < 2048, (sizes, added)  # (the safetensors header's few lines)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_the_decoder_computes_its_logits_with_the_stored_head(engines, kind, tiny_llama, tiny_llama_mha):
    """The engine's logits are those of the same weights with the stored int8 head dequantized into a float
    lm_head (the runtime's quantized linear against a plain matmul), and within int8_wo's bounds of
    transformers."""
    from runtime.model import Decoder
    from runtime.spec import ModelSpec

    from engine_factory.stages.validate import QUANT_BOUNDS

    engine = Engine.load(engines[kind, True], device="cpu")
    assert engine.model.quant_head is not None
    prompts = [[3, 5, 7, 11, 13], [2, 40, 9]]
    got = [engine.score(ids) for ids in prompts]
    t = load_file(str(engines[kind, True] / "rank0.safetensors"))
    t["lm_head.weight"] = t["lm_head.weight"].float() * t.pop("lm_head.scale")[:, None]
    meta = json.loads((engines[kind, True] / "engine.json").read_text())
    plain = Decoder(ModelSpec.from_dict(meta["spec"]), t, quant="int8_wo")
    plain.allocate_cache(1, 32)
    ref = hf_model(tiny_llama if kind == "tied" else tiny_llama_mha)
    for ids, ours in zip(prompts, got):
        want = plain.prefill(torch.tensor(ids), [len(ids)], all_logits=True)
        assert (ours - want).abs().max() <= 1e-4 * want.abs().max()
        hf = hf_logits(ref, ids)
        assert (ours - hf).abs().max() / hf.abs().max() <= QUANT_BOUNDS["int8_wo"][0]


def test_engine_json_that_says_otherwise_is_refused_before_a_weight_is_read(engines):
    """A rewritten engine.json (quant.lm_head dropped, or said of a float head) against the rank file's header."""
    from runtime.rank_files import check_rank_file

    for kind, head in (("untied", True), ("untied", False), ("tied", True)):
        engine_dir = engines[kind, head]
        meta = json.loads((engine_dir / "engine.json").read_text())
        check_rank_file(engine_dir / "rank0.safetensors", meta, 0)  # as built: accepted
        meta["quant"]["lm_head"] = not head
        with pytest.raises(EngineError, match="lm_head"):
            check_rank_file(engine_dir / "rank0.safetensors", meta, 0)


# llama (untied) and bloom (tied), vocabulary 301: at tp2 each rank holds 151 rows, one of them padding
CONFIGS = {
    "llama": "architectures:[LlamaForCausalLM],model_type:llama,hidden_size:128,intermediate_size:256,"
             "num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,vocab_size:301,max_position_embeddings:128",
    "bloom": "architectures:[BloomForCausalLM],model_type:bloom,hidden_size:128,n_layer:2,n_head:4,vocab_size:301",
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_tp2_gives_tp1_greedy_tokens_with_the_head_quantized(tmp_path, family):
    """The whole head is quantized, then cut by vocabulary rows with the float head's padding: tp2's logits
    gathered are tp1's, so the same tokens (fp32 activations, as the weight-only modes' tp test)."""
    prompts = [[1, 2, 3, 4], [7, 8]]
    for mode in ("int8_wo", "int4_wo_g64"):
        toks = []
        for tp in (1, 2):
            d = build_in_process("dummy", tmp_path, f"+model.config={{{CONFIGS[family]}}}", f"precision={mode}",
                                 "precision.dtype=fp32", HEAD, f"parallel.tp={tp}", "validate.enabled=false")
            names = set(load_file(str(d / "rank0.safetensors")))
            assert {"lm_head.weight", "lm_head.scale"} <= names and ("lm_head.zero" in names) == (mode != "int8_wo")
            engine = Engine.load(d, device="cpu")
            try:
                assert engine.model.quant_head is not None
                toks.append([o.output_ids for o in engine.generate(prompts, max_new_tokens=8, ignore_eos=True)])
            finally:
                engine.close()
        assert toks[0] == toks[1], mode


@pytest.mark.parametrize("overrides, fragments", [
    (["precision=fp16"], ["precision.quant=none stores every weight", "int8_wo"]),
    (["precision=sq", "calibration.dataset=random"], ["precision.quant=sq", "calibrated", "int4_wo_g128"]),
    (["precision=int8_wo", "parallel.tp=2", "parallel.embedding_sharding=vocab", "parallel.share_embedding=true"],
     ["parallel.share_embedding=true", "drop one"]),
])
def test_a_head_that_cannot_be_quantized_is_one_line(cli, store, tiny_llama, overrides, fragments):
    assert_one_clear_line(cli(f"model.source={tiny_llama}", f"store={store}", HEAD, *overrides),
                          "precision.quant_lm_head=true", *fragments)


def test_only_the_weight_only_modes_take_the_head():
    assert {m for m, x in MODES.items() if x.lm_head} == {"int8_wo", "int4_wo", "int4_wo_g128", "int4_wo_g64",
                                                          "int4_wo_g32"}


def test_engine_json_with_a_head_its_layout_cannot_have_is_refused_in_one_line(engines, tmp_path):
    """quant.lm_head=true beside a tied spec, or with a mode that takes no head: refused when engine.json is read
    (a KeyError deep in a linear otherwise)."""
    from runtime.format import read_engine_config

    meta = json.loads((engines["tied", False] / "engine.json").read_text())
    for change in ({"lm_head": True}, {"lm_head": True, "mode": "none"}):
        bad = {**meta, "quant": {**meta["quant"], **change}}
        (tmp_path / "engine.json").write_text(json.dumps(bad))
        with pytest.raises(EngineError, match="quant.lm_head=true") as e:
            read_engine_config(tmp_path / "engine.json")
        assert "\n" not in str(e.value)


def test_the_plan_counts_the_head_and_its_dequantized_copy(cli, store, tiny_llama):
    """Weights: the head's int8 copy (tied) and its scale; activations: the largest weight a quantized linear
    dequantizes whole for a call of many rows, the head's now (512 x 64 against mlp.up's 256 x 64), fp16."""
    from helpers import LIMITS

    plans = {}
    for head in (False, True):
        rc, out, err = cli(f"model.source={tiny_llama}", f"store={store}", "plan=true", "precision=int8_wo",
                           f"precision.quant_lm_head={str(head).lower()}", *LIMITS)
        assert rc == 0, err[-2000:]
        plans[head] = json.loads(out.strip().splitlines()[-1])["ranks"][0]
    assert plans[True]["weight_bytes"] - plans[False]["weight_bytes"] == 512 * 64 + 512 * 2
    assert plans[True]["activation_bytes"] - plans[False]["activation_bytes"] == (512 * 64 - 256 * 64) * 2


def test_a_sweep_report_compares_a_tied_models_quantized_head_with_its_fp32_engine():
    from engine_factory.report import _model_key

    spec = {"family": "llama", "vocab_size": 512, "tie_word_embeddings": True}
    fp32 = {"source": {"digest": "abc", "path": "/a"}, "spec": spec}
    head = {"source": {"digest": "abc", "path": "/b"}, "spec": {**spec, "tie_word_embeddings": False}}
    assert _model_key(fp32) == _model_key(head)
    assert _model_key(fp32) != _model_key({**head, "source": {"digest": "other"}})
