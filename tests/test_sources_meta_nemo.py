"""Non-HF checkpoint formats written by the tests themselves in their real key layout: Meta's consolidated.*.pth
(2 tensor-parallel shards, interleaved rotary rows) against the transformers model they came from, and a NeMo
GPT-Next .nemo against an independent Megatron forward; plus dummy builds of the GPT-Next architecture."""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from engine_factory import config, families
from engine_factory.checks import check_config
from engine_factory.sources import open_source
from engine_factory.sources.meta import ffn_dim
from engine_factory.store import Store
from helpers import LIMITS, build_in_process, engine_path, hf_greedy, hf_logits, rank_digests
from runtime import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENS = [3, 17, 8, 1, 12]  # different lengths, one of a single token, more than max_batch_size (4)
NEW_TOKENS = 32


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


# ---- Meta ------------------------------------------------------------------------------------------
# Meta's params.json for the tiny model: the 70B's way of sizing the FFN (multiplier + multiple_of).
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 32, "ffn_dim_multiplier": 1.3,
          "norm_eps": 1e-6, "vocab_size": -1, "rope_theta": 50000.0, "max_seq_len": 256}
# Meta name pattern -> (HF name pattern, dim of its tensor-parallel split; None: replicated)
_META = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
         "output.weight": ("lm_head.weight", 0),
         **{f"layers.{{}}.{m}.weight": (f"model.layers.{{}}.{h}.weight", d) for m, h, d in (
             ("attention.wq", "self_attn.q_proj", 0), ("attention.wk", "self_attn.k_proj", 0),
             ("attention.wv", "self_attn.v_proj", 0), ("attention.wo", "self_attn.o_proj", 1),
             ("feed_forward.w1", "mlp.gate_proj", 0), ("feed_forward.w3", "mlp.up_proj", 0),
             ("feed_forward.w2", "mlp.down_proj", 1), ("attention_norm", "input_layernorm", None),
             ("ffn_norm", "post_attention_layernorm", None))}}


def _to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rows of each head (x0..x_{d/2-1}, y0..) -> Meta's interleaved pairs (x0, y0, x1, y1, ..)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _write_meta(model, folder: Path, shards: int) -> Path:
    sd = model.state_dict()
    folder.mkdir(parents=True)
    meta = {}
    for pattern, (hf, dim) in _META.items():
        for i in range(PARAMS["n_layers"]) if "{}" in pattern else [None]:
            t = sd[hf.format(i)]
            if ".wq." in pattern or ".wk." in pattern:
                t = _to_meta_rotary(t, PARAMS["n_heads"] if ".wq." in pattern else PARAMS["n_kv_heads"])
            meta[pattern.format(i)] = (t, dim)
    for r in range(shards):  # clone: torch.save of a view would write the whole storage
        torch.save({k: (t if d is None else t.chunk(shards, d)[r]).clone() for k, (t, d) in meta.items()},
                   folder / f"consolidated.{r:02d}.pth")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    return folder


@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory, shared):
    """(HF model, 2-shard Meta folder, 1-shard Meta folder); tokenizer.model one folder up, as Meta ships it
    (stories260K's, whose 512 pieces fit the model, when the shared folder has it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("meta")
    if (shared / "models/stories260K/tokenizer.model").is_file():
        (root / "tokenizer.model").write_bytes((shared / "models/stories260K/tokenizer.model").read_bytes())
    torch.manual_seed(3)
    ffn = ffn_dim(PARAMS["dim"], PARAMS["multiple_of"], PARAMS["ffn_dim_multiplier"])
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    model = LlamaForCausalLM(cfg).eval()
    return model, _write_meta(model, root / "llama-tiny", 2), _write_meta(model, root / "llama-tiny-1", 1)


def test_meta_source_is_detected_before_hf_folders(meta_ckpt, tmp_path):
    _, two, _ = meta_ckpt
    store, none = Store(tmp_path / "store"), OmegaConf.create({"config": None})
    src = open_source(str(two), none, store)
    assert src.kind == "meta" and src.hf_config["intermediate_size"] == 224 and src.hf_config["vocab_size"] == 512
    tokenizer = {"tokenizer.model"} if (two.parent / "tokenizer.model").is_file() else set()
    assert set(src.provenance["files"]) == {"params.json", "consolidated.00.pth", "consolidated.01.pth", *tokenizer}
    assert src.reference()[0] is None and "no transformers reader" in src.reference()[1]
    (tmp_path / "hf").mkdir()  # a folder with params.json but no shards stays an HF folder
    (tmp_path / "hf" / "params.json").write_text("{}")
    with pytest.raises(Exception, match="no config.json"):
        open_source(str(tmp_path / "hf"), none, store)
    # LLaMA-2 70B's params.json gives the intermediate size of conf/model/llama2_70b_meta.yaml
    assert ffn_dim(8192, 4096, 1.3) == config.compose(["model=llama2_70b_meta"]).model.config.intermediate_size


def test_meta_checkpoint_builds_an_engine_equal_to_transformers(meta_ckpt, cli, store):
    model, two, one = meta_ckpt
    engine_dir = engine_path(cli(f"model.source={two}", "precision=fp32", f"store={store}", *LIMITS))
    validation = json.loads((engine_dir / "validation.json").read_text())
    assert "no transformers reader" in validation["parity"]["skipped"]
    engine = Engine.load(engine_dir, device="cpu")
    prompts = _prompts(512)
    for ids in prompts:
        assert (engine.score(ids) - hf_logits(model, ids)).abs().max().item() <= 1e-4
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [g.output_ids for g in gens] == [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]
    if engine.tokenizer is not None:
        assert engine.encode("Once upon a time") == [1, 403, 407, 261, 378]  # SentencePiece ids after BOS
    # Meta's 1-shard layout of the same weights: other source files, the same rank files
    single = build_in_process(one, store, "precision=fp32", "validate.enabled=false")
    assert single != engine_dir and rank_digests(single) == rank_digests(engine_dir)


# ---- NeMo GPT-Next -----------------------------------------------------------------------------------
# GPT-2B-001's flags at toy size (layernorm1p, no biases, fast-swiglu, rotary on half of each head, untied head),
# and the other Megatron options the family maps (layer norm, biases, fused bias-gelu, grouped qkv, tied head).
GPT_2B = {"target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
          "hidden_size": 64, "ffn_hidden_size": 96, "num_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 128, "encoder_seq_length": 128, "normalization": "layernorm1p",
          "layernorm_epsilon": 1e-5, "bias": False, "activation": "fast-swiglu", "position_embedding_type": "rope",
          "rotary_percentage": 0.5, "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 128,
          "tokenizer": {"library": "sentencepiece", "model": "nemo:0a1b2c_tokenizer.model"}}
OTHER = {**GPT_2B, "normalization": "layernorm", "bias": True, "activation": "gelu", "rotary_percentage": 1.0,
         "num_query_groups": 2, "share_embeddings_and_output_weights": True}
_P = "model.language_model."


def _nemo_weights(c: dict, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    H, F4, hd = c["hidden_size"], c["ffn_hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c.get("num_query_groups", c["num_attention_heads"])) * hd
    h4h = 2 * F4 if c["activation"].endswith("glu") else F4
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    sd = {_P + "embedding.word_embeddings.weight": r(vocab, H), _P + "encoder.final_layernorm.weight": r(H),
          _P + "encoder.final_layernorm.bias": r(H), _P + "rotary_pos_emb.inv_freq": torch.ones(8)}  # a saved buffer
    if not c["share_embeddings_and_output_weights"]:
        sd[_P + "output_layer.weight"] = r(vocab, H)
    for i in range(c["num_layers"]):
        E = f"{_P}encoder.layers.{i}."
        for name, shape in (("input_layernorm", (H,)), ("self_attention.query_key_value", (qkv, H)),
                            ("self_attention.dense", (H, H)), ("post_attention_layernorm", (H,)),
                            ("mlp.dense_h_to_4h", (h4h, H)), ("mlp.dense_4h_to_h", (H, F4))):
            sd[E + name + ".weight"] = r(*shape) if len(shape) == 2 or c["normalization"] == "layernorm1p" else 1 + r(H)
            if c["bias"] or "norm" in name:
                sd[E + name + ".bias"] = r(shape[0])
    return sd


def _megatron_logits(c: dict, sd: dict, ids: list[int]) -> torch.Tensor:
    """Megatron GPT's forward from its formulas: pre-LN (layernorm1p: gamma + 1), fused qkv rows per query group
    (groups, heads per group + 2, head_dim), rotary on the first rotary_percentage of each head (rotate_half),
    fast-swiglu = silu(first half of dense_h_to_4h) * second half, or the fused bias-gelu (tanh). (T, V)."""
    T, H, nh = len(ids), c["hidden_size"], c["num_attention_heads"]
    ng, hd = c.get("num_query_groups", nh), H // nh
    rd = int(hd * c["rotary_percentage"])
    one = 1.0 if c["normalization"] == "layernorm1p" else 0.0
    ln = lambda x, p: F.layer_norm(x, (H,), sd[p + ".weight"] + one, sd[p + ".bias"], c["layernorm_epsilon"])  # noqa
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd.get(p + ".bias", 0.0)  # noqa: E731
    freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd))
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # (T, 1, rd)

    def rope(t):  # (T, nh, hd)
        r, rest = t[..., :rd], t[..., rd:]
        x1, x2 = r.chunk(2, dim=-1)
        return torch.cat([r * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin(), rest], dim=-1)

    x = sd[_P + "embedding.word_embeddings.weight"][ids]  # (T, H)
    causal = torch.ones(T, T).tril().bool()
    for i in range(c["num_layers"]):
        E = f"{_P}encoder.layers.{i}."
        qkv = lin(ln(x, E + "input_layernorm"), E + "self_attention.query_key_value").view(T, ng, nh // ng + 2, hd)
        q, k, v = qkv[:, :, :-2].reshape(T, nh, hd), qkv[:, :, -2], qkv[:, :, -1]  # k, v: (T, ng, hd)
        k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
        scores = torch.einsum("qhd,khd->hqk", rope(q), rope(k)) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin(torch.einsum("hqk,khd->qhd", probs, v).reshape(T, H), E + "self_attention.dense")
        h = lin(ln(x, E + "post_attention_layernorm"), E + "mlp.dense_h_to_4h")
        if c["activation"] == "fast-swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        x = x + lin(h, E + "mlp.dense_4h_to_h")
    head = _P + ("embedding.word_embeddings" if c["share_embeddings_and_output_weights"] else "output_layer")
    return ln(x, _P + "encoder.final_layernorm") @ sd[head + ".weight"].T


def _megatron_greedy(c: dict, sd: dict, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(_megatron_logits(c, sd, ids + out)[-1].argmax()))
    return out


def _write_nemo(path: Path, c: dict, sd: dict, tokenizer: bytes) -> Path:
    """An uncompressed tar laid out as NeMo writes it ('./' names)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    with tarfile.open(path, "w:") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(c).encode()), ("model_weights.ckpt", buf.getvalue()),
                           ("0a1b2c_tokenizer.model", tokenizer)):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("c", [GPT_2B, OTHER], ids=["gpt-2b-001-flags", "gelu-bias-gqa-tied"])
def test_nemo_checkpoint_builds_an_engine_equal_to_megatron(c, need_shared, cli, store, tmp_path):
    tok = need_shared("models/stories260K/tokenizer.model").read_bytes()
    sd = _nemo_weights(c, 512)  # stories260K's 512 pieces, already a multiple of make_vocab_size_divisible_by
    path = _write_nemo(tmp_path / "GPT-tiny.nemo", c, sd, tok)
    engine = Engine.load(engine_path(cli(f"model.source={path}", "precision=fp32", f"store={store}", *LIMITS)),
                         device="cpu")
    assert engine.spec.rotary_dim == int(16 * c["rotary_percentage"]) and engine.spec.qkv_bias == c["bias"]
    prompts = _prompts(512, seed=1)
    for ids in prompts:
        assert (engine.score(ids) - _megatron_logits(c, sd, ids)).abs().max().item() <= 1e-4
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [g.output_ids for g in gens] == [_megatron_greedy(c, sd, ids, NEW_TOKENS) for ids in prompts]
    assert engine.encode("Once upon a time") == [403, 407, 261, 378]  # NeMo's generation adds no BOS


def test_gpt_next_2b_config_and_dummy_builds(cli, tmp_path):
    cfg = config.compose(["model=gpt_next_2b"])
    check_config(cfg)
    hf = OmegaConf.to_container(cfg.model.config)
    spec = families.resolve(hf).to_spec(hf)
    assert (spec.family, spec.head_dim, spec.rotary_dim, spec.intermediate_size) == ("gpt_next", 128, 64, 5440)
    small = ["model=gpt_next_2b", "model.source=dummy", "model.config.num_layers=2", "model.config.hidden_size=64",
             "model.config.num_attention_heads=4", "model.config.ffn_hidden_size=96", "model.config.vocab_size=1000",
             "precision=fp32", "validate.enabled=false", f"store={tmp_path / 'store'}", *LIMITS]
    variants = {(): (8, "gated", "silu", False),  # GPT-2B-001's flags, smaller
                ("model.config.activation=gelu", "model.config.bias=true", "model.config.rotary_percentage=1.0"):
                    (16, "plain", "gelu_tanh", True)}
    for overrides, (rd, mlp, act, bias) in variants.items():
        engine = Engine.load(engine_path(cli(*small, *overrides)), device="cpu")
        s = engine.spec
        assert (s.vocab_size, s.num_layers, s.rotary_dim) == (1000, 2, rd)
        assert (s.mlp, s.activation, s.qkv_bias) == (mlp, act, bias)
        (g,) = engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
        assert len(g.output_ids) == 4


def test_nemo_archives_without_one_weights_file_are_refused(tmp_path):
    from runtime.errors import UserError

    path = tmp_path / "tp2.nemo"  # a tensor-parallel save: one state dict per rank
    with tarfile.open(path, "w:") as tar:
        for name, data in (("model_config.yaml", yaml.safe_dump(GPT_2B).encode()),
                           ("mp_rank_00/model_weights.ckpt", b""), ("mp_rank_01/model_weights.ckpt", b"")):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match=r"no model_weights.ckpt \(it holds \['mp_rank_00', 'mp_rank_01'\]\)"):
        open_source(str(path), OmegaConf.create({"config": None}), Store(tmp_path / "store"))
