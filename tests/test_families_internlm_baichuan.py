"""InternLM and Baichuan: trust_remote_code models on the hub, read with our own spec (their code never runs).

Tiny checkpoints in the hub repos' key layout and config.json format, against an equivalent reference in
fp32: transformers' LLaMA with the same weights (InternLM = LLaMA with q/k/v/o biases; Baichuan 7B =
LLaMA with q/k/v packed in W_pack; Baichuan 2 also normalises its lm_head rows), or, for Baichuan 13B
(ALiBi, which transformers has no class for), a plain-torch forward written from the published formulas.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from engine_factory import families
from engine_factory.paths import conf_dir
from helpers import LIMITS, assert_scores_match, build_in_process, engine_path, hf_greedy, hf_logits
from runtime import Engine
from runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LAYERS = 512, 2
NEW_TOKENS = 32
MODELS = ["internlm", "baichuan_v1_7b", "baichuan_v2_7b", "baichuan_v1_13b", "baichuan_v2_13b"]


@dataclass
class Case:
    folder: object
    overrides: list  # model.version= where the tiny config cannot say
    version: str | None  # what the engine's spec records
    logits: Callable  # ids -> (T, V)
    greedy: Callable  # (ids, n) -> n tokens


# ---- tiny checkpoints in the hub layout ---------------------------------------------------------------
def _llama(seed: int, heads: int, hidden: int, bias: bool = False, theta: float = 10000.0):
    """A random LLaMA (MHA, untied head) whose norms and biases are not their init's ones and zeros."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.1, attention_bias=bias, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": theta})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _hub_config(model, family: str, arch: str, **fields) -> dict:
    """config.json as the remote-code repos write it (auto_map and all)."""
    c, cls = model.config, {"internlm": "InternLM", "baichuan": "Baichuan"}[family]
    return {"architectures": [arch], "auto_map": {"AutoConfig": f"configuration_{family}.{cls}Config",
                                                  "AutoModelForCausalLM": f"modeling_{family}.{arch}"},
            "model_type": family, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "initializer_range": 0.02,
            "num_attention_heads": c.num_attention_heads, "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.29.2",
            "use_cache": True, "vocab_size": VOCAB, **fields}


def _write(folder, config: dict, tensors: dict, bin: bool = False):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if bin:  # what Baichuan-7B ships: pytorch_model.bin, rotary inv_freq buffers included
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _w_pack(sd: dict) -> dict:
    """LLaMA's q/k/v_proj -> Baichuan's one self_attn.W_pack per layer, rows [q; k; v]."""
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        sd[p + "W_pack.weight"] = torch.cat([sd.pop(p + f"{x}_proj.weight") for x in "qkv"])
    return sd


def _row_scales(seed: int) -> torch.Tensor:
    """Baichuan 2's lm_head rows have any length (its NormHead normalises them): scale rows by 0.2..5."""
    return 0.2 + 4.8 * torch.rand(VOCAB, 1, generator=torch.Generator().manual_seed(seed))


def _hf_case(folder, model, version=None, overrides=()) -> Case:
    return Case(folder, list(overrides), version, lambda ids: hf_logits(model, ids),
                lambda ids, n: hf_greedy(model, ids, n))


def _internlm(folder) -> Case:
    model = _llama(10, heads=4, hidden=64, bias=True, theta=50000.0)
    _write(folder, _hub_config(model, "internlm", "InternLMForCausalLM", bias=True, max_position_embeddings=256,
                               rotary={"base": 50000, "type": "dynamic"}), model.state_dict())
    return _hf_case(folder, model)


def _baichuan_rope(folder, v2: bool) -> Case:
    model = _llama(11 + v2, heads=4, hidden=64)
    sd = _w_pack(dict(model.state_dict()))
    if v2:  # the reference holds the unit rows; the checkpoint those rows scaled
        with torch.no_grad():
            model.lm_head.weight.copy_(F.normalize(model.lm_head.weight, dim=1))
        sd["lm_head.weight"] = model.lm_head.weight * _row_scales(12)
        _write(folder, _hub_config(model, "baichuan", "BaichuanForCausalLM", max_position_embeddings=256,
                                   model_max_length=256, z_loss_weight=0), sd)
        return _hf_case(folder, model, "v2_7b", ["model.version=v2_7b"])
    sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": model.model.rotary_emb.inv_freq
               for i in range(LAYERS)})
    _write(folder, _hub_config(model, "baichuan", "BaiChuanForCausalLM", max_position_embeddings=256), sd, bin=True)
    return _hf_case(folder, model, "v1_7b")  # detected: only Baichuan-7B spells BaiChuanForCausalLM


def _baichuan_alibi(folder, v2: bool) -> Case:
    heads = 12 if v2 else 6  # ALiBi slopes of head counts that are not powers of two
    model = _llama(13 + v2, heads=heads, hidden=8 * heads)  # for its weights only: its forward is RoPE's
    sd = _w_pack(dict(model.state_dict()))
    if v2:
        sd["lm_head.weight"] = sd["lm_head.weight"] * _row_scales(14)
    _write(folder, _hub_config(model, "baichuan", "BaichuanForCausalLM", model_max_length=256), sd)
    ref = _AlibiReference(sd, heads, norm_head=v2)
    # v1: detected (vocab 512 is not Baichuan 2's, width 8*heads is not 7B's 4096); v2 must be named
    return Case(folder, ["model.version=v2_13b"] if v2 else [], "v2_13b" if v2 else "v1_13b", ref.logits, ref.greedy)


_MAKERS = {"internlm": _internlm, "baichuan_v1_7b": lambda f: _baichuan_rope(f, False),
           "baichuan_v2_7b": lambda f: _baichuan_rope(f, True), "baichuan_v1_13b": lambda f: _baichuan_alibi(f, False),
           "baichuan_v2_13b": lambda f: _baichuan_alibi(f, True)}


# ---- the independent ALiBi reference ---------------------------------------------------------------------
def _alibi_slopes(n: int) -> list[float]:
    """Press et al.'s slopes, with their recipe for n not a power of two (Baichuan's _get_interleave)."""
    def pow2(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + _alibi_slopes(2 * c)[0::2][:n - c]


class _AlibiReference:
    """Baichuan-13B's forward in plain torch: full attention over the whole sequence, no cache, the mask
    of its remote code: slope_h * j for key j (its row-constant offset cancels in the softmax), -inf above
    the diagonal."""

    def __init__(self, sd: dict, heads: int, norm_head: bool):
        self.w, self.nh = {k: v.detach().float() for k, v in sd.items()}, heads
        head = self.w["lm_head.weight"]
        self.head = head / head.norm(dim=1, keepdim=True).clamp_min(1e-12) if norm_head else head

    def _rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w[name]

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        w, T = self.w, len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]  # (T, H)
        H = x.shape[1]
        hd = H // self.nh
        slopes = torch.tensor(_alibi_slopes(self.nh))
        mask = slopes[:, None, None] * torch.arange(T, dtype=torch.float32)[None, None, :]  # (nh, 1, T)
        mask = mask + torch.full((T, T), float("-inf")).triu(1)  # (nh, T, T)
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            h = self._rms(x, p + "input_layernorm.weight")
            q, k, v = (t.view(T, self.nh, hd).transpose(0, 1)  # (nh, T, hd)
                       for t in (h @ w[p + "self_attn.W_pack.weight"].T).split(H, dim=-1))
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, dim=-1)  # (nh, T, T)
            x = x + (att @ v).transpose(0, 1).reshape(T, H) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, p + "post_attention_layernorm.weight")
            gated = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            x = x + gated @ w[p + "mlp.down_proj.weight"].T
        return self._rms(x, "model.norm.weight") @ self.head.T

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(ids):]


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("remote-code-ckpt"), {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = _MAKERS[name](root / name)
        return made[name]
    return get


@pytest.fixture(scope="module")
def engine_of(case, tmp_path_factory):
    store, built = tmp_path_factory.mktemp("remote-code-store"), {}

    def get(name: str) -> Engine:
        if name not in built:
            c = case(name)
            engine_dir = build_in_process(c.folder, store, "precision=fp32", "validate.enabled=false", *c.overrides)
            built[name] = Engine.load(engine_dir, device="cpu")
        return built[name]
    return get


def _prompts(lens, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]


def _hub_option(name: str) -> dict:
    return yaml.safe_load((conf_dir() / "model" / f"{name}.yaml").read_text())["config"]


# ---- parity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_fp32_logits_match_the_reference(engine_of, case, name):
    engine, c = engine_of(name), case(name)
    assert engine.spec.family == name.split("_")[0] and engine.spec.extra.get("version") == c.version
    assert engine.spec.position == ("alibi" if name.endswith("13b") else "rope")
    prompts = _prompts([1, 5, 23, 64], seed=0)  # 64 = max_input_len
    assert_scores_match(engine, prompts, c.logits)  # packed prefill of the batch, and one by one


@pytest.mark.parametrize("name", MODELS)
def test_fp32_greedy_batch_matches_the_reference(engine_of, case, name):
    engine, c = engine_of(name), case(name)
    prompts = _prompts([3, 17, 8, 1, 12], seed=1)  # more than max_batch_size (4)
    gens = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [g.output_ids for g in gens] == [c.greedy(ids, NEW_TOKENS) for ids in prompts]


def test_norm_head_only_in_baichuan_2(engine_of):
    for name in ("baichuan_v1_7b", "baichuan_v2_7b", "baichuan_v1_13b", "baichuan_v2_13b"):
        norms = engine_of(name).model.lm_head.norm(dim=1)
        unit = torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
        assert unit == ("_v2_" in name), name


# ---- versions and the hub's configs ------------------------------------------------------------------
@pytest.mark.parametrize("option", ["baichuan_v1_7b", "baichuan_v1_13b", "baichuan_v2_7b", "baichuan_v2_13b"])
def test_baichuan_version_is_detected_from_the_hub_config(option):
    c, version = _hub_option(option), option[len("baichuan_"):]
    family = families.resolve(c)
    assert family.model_type == "baichuan" and family.detect_version(c) == version
    spec = family.spec(c)
    assert spec.position == ("alibi" if version.endswith("13b") else "rope")
    assert spec.extra == {"version": version, "norm_head": version.startswith("v2")}
    assert spec.num_kv_heads == spec.num_heads and spec.max_position_embeddings == 4096
    assert not (spec.qkv_bias or spec.o_bias or spec.mlp_bias or spec.tie_word_embeddings)
    other = "v1_7b" if version == "v2_13b" else "v2_13b"  # model.version= overrides the config
    assert family.spec(c, other).extra["version"] == other
    with pytest.raises(UserError, match="model.version=v3_7b is not a baichuan version; one of v1_7b, v1_13b"):
        family.spec(c, "v3_7b")


@pytest.mark.parametrize("option, bias", [("internlm_chat_7b", True), ("internlm_chat_20b", False)])
def test_internlm_spec_from_the_hub_config(option, bias):
    c = _hub_option(option)
    family = families.resolve(c)
    spec = family.spec(c)
    assert family.model_type == "internlm" and spec.family == "internlm"
    assert spec.qkv_bias == spec.o_bias == bias and not spec.mlp_bias
    assert (spec.norm, spec.mlp, spec.position, spec.rope_theta) == ("rms", "gated", "rope", 10000.0)
    with pytest.raises(UserError, match="has no versions"):
        family.spec(c, "v1_7b")


# ---- the CLI, end to end -----------------------------------------------------------------------------
def test_cli_builds_internlm(case, cli, store):
    c = case("internlm")
    engine_dir = engine_path(cli(f"model.source={c.folder}", "precision=fp32", f"store={store}", *LIMITS))
    info = json.loads((engine_dir / "engine.json").read_text())
    assert info["family"] == "internlm" and info["spec"]["qkv_bias"] and info["spec"]["o_bias"]
    assert info["spec"]["rope_theta"] == 50000.0  # from config.json's rotary.base
    # transformers has no internlm: validate skips parity and says why (the tests above are its parity)
    assert "internlm" in json.loads((engine_dir / "validation.json").read_text())["parity"]["skipped"]
    ids = _prompts([20], seed=2)[0]
    assert (Engine.load(engine_dir, device="cpu").score(ids) - c.logits(ids)).abs().max().item() <= 1e-4


def test_cli_builds_baichuan2_13b_named_by_model_version(case, cli, store):
    c = case("baichuan_v2_13b")
    config = json.loads((c.folder / "config.json").read_text())
    assert families.resolve(config).detect_version(config) == "v1_13b"  # the tiny shape alone says v1
    engine_dir = engine_path(cli(f"model.source={c.folder}", "model.version=v2_13b", "precision=fp32",
                                 f"store={store}", *LIMITS))
    info = json.loads((engine_dir / "engine.json").read_text())
    assert info["family"] == "baichuan" and info["spec"]["position"] == "alibi" and info["spec"]["num_heads"] == 12
    assert info["spec"]["extra"] == {"version": "v2_13b", "norm_head": True}
    assert "baichuan" in json.loads((engine_dir / "validation.json").read_text())["parity"]["skipped"]
    ids = _prompts([20], seed=3)[0]
    assert (Engine.load(engine_dir, device="cpu").score(ids) - c.logits(ids)).abs().max().item() <= 1e-4


def test_remote_code_tokenizer_is_read_without_running_it(case, need_shared, tmp_path):
    """InternLM's tokenizer_config.json names InternLMTokenizer through auto_map (remote code): the family's
    LlamaTokenizer reads the same SentencePiece model, and the engine's copy loads without remote code."""
    import sentencepiece

    sp_model = need_shared("models/stories260K") / "tokenizer.model"  # 512 pieces: fits the tiny vocab
    src = tmp_path / "internlm-with-tokenizer"
    shutil.copytree(case("internlm").folder, src)
    shutil.copy(sp_model, src)
    (src / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]},
        "tokenizer_class": "InternLMTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    engine_dir = build_in_process(src, tmp_path / "store", "precision=fp32", "validate.enabled=false")
    assert "auto_map" not in json.loads((engine_dir / "tokenizer" / "tokenizer_config.json").read_text())
    engine = Engine.load(engine_dir, device="cpu")
    text = "Once upon a time, there was a little dog."
    assert engine.encode(text) == [1] + sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).encode(text)
