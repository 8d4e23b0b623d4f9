"""Tensor and pipeline parallelism: the shard plan (runtime/shard.py) and the per-rank layout
(runtime/parallel.py) against independent re-assembly and transformers' ALiBi, the tp/pp checks, and
multi-rank engines run as gloo process groups on CPU against their tp1 engine: fp32 logits of a batch of
prompts of different lengths within 1e-4, and the same 32 greedy tokens.

The ranks run in forked processes that this module starts (one group per world shape, every engine of
that shape loaded in turn), each building Decoder(spec, its rank file, layout, Comm(tp, pp))."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_factory import config
from engine_factory.checks import check_model
from helpers import build_in_process, random_checkpoint, rank_digests
from runtime.errors import UserError
from runtime.format import ENGINE_JSON, rank_file
from runtime.model import Decoder, alibi_slopes
from runtime.parallel import Comm, RankLayout
from runtime.shard import rank_tensor_names, shard_shape, shard_tensor
from runtime.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LENS = [3, 17, 8, 1]  # different lengths, one of a single token; = the engines' max_batch_size
NEW_TOKENS = 32
SEQ = 64  # cache positions: longest prompt + new tokens fit
CHECKPOINTS = {  # transformers class, config: the families whose parallel special cases differ
    "bloom_6_heads": ("Bloom", dict(vocab_size=384, n_layer=2, hidden_size=48, n_head=6, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=3)),  # ALiBi, 6 heads: tp2 / tp3 slopes
    "bigcode_mqa": ("GPTBigCode", dict(vocab_size=384, n_layer=2, n_positions=128, n_embd=64, n_head=8, n_inner=96,
                                       multi_query=True, bos_token_id=0, eos_token_id=0)),  # one KV head
}
# engine key -> (checkpoint, overrides); the tp1 engine of each checkpoint is the reference
ENGINES = {
    "llama_tp2": ("tiny_llama", ["parallel.tp=2"]),
    "llama_tp4": ("tiny_llama", ["parallel.tp=4"]),  # 2 KV heads on 4 ranks: copies
    "llama_pp2": ("tiny_llama", ["parallel.pp=2"]),
    "llama_tp2_pp2": ("tiny_llama", ["parallel.tp=2", "parallel.pp=2"]),
    "llama_tp2_vocab": ("tiny_llama", ["parallel.tp=2", "parallel.embedding_sharding=vocab"]),
    "llama_tp2_hidden": ("tiny_llama", ["parallel.tp=2", "parallel.embedding_sharding=hidden"]),
    "llama_tp2_share": ("tiny_llama", ["parallel.tp=2", "parallel.embedding_sharding=vocab",
                                       "parallel.share_embedding=true"]),
    "llama_mha_tp2_int8": ("tiny_llama_mha", ["parallel.tp=2", "precision.quant=int8_wo"]),  # biases, scales
    "gpt2_tp2": ("tiny_gpt2", ["parallel.tp=2"]),  # vocab 50257: padded lm_head
    "gpt2_tp2_vocab": ("tiny_gpt2", ["parallel.tp=2", "parallel.embedding_sharding=vocab"]),  # padded embedding
    "bloom_tp2": ("bloom_6_heads", ["parallel.tp=2"]),
    "bloom_tp3": ("bloom_6_heads", ["parallel.tp=3"]),
    "bigcode_tp4": ("bigcode_mqa", ["parallel.tp=4"]),
}
# pipelined engines again with other micro-batch counts (ENGINES run with the default, pp = 2 here):
# run key -> (engine key, micro-batches, prompts); 3 micro-batches of 2 prompts: more micro-batches than rows
MICRO_RUNS = {f"{key}~m{m}b{n}": (key, m, n) for key in ("llama_pp2", "llama_tp2_pp2")
              for m, n in ((1, 4), (3, 4), (3, 2))}
RUNS = {**{key: (key, None, len(PROMPT_LENS)) for key in ENGINES}, **MICRO_RUNS}


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    """checkpoint(name) -> a tiny HF folder: conftest's LLaMA / GPT-2 fixtures, or BLOOM / BigCode with every
    parameter random (biases and norms too)."""
    made = {}

    def get(name: str) -> Path:
        if name not in CHECKPOINTS:
            return request.getfixturevalue(name)
        if name not in made:
            kind, cfg = CHECKPOINTS[name]
            made[name] = random_checkpoint(tmp_path_factory.mktemp("ckpt") / name, kind, cfg,
                                           seed=10 + list(CHECKPOINTS).index(name))
        return made[name]
    return get


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory):
    """engine_dir(key) -> an fp32 engine folder of ENGINES[key] (or "<checkpoint>@tp1", "<checkpoint>@tp1_int8")."""
    store, built = tmp_path_factory.mktemp("parallel-store"), {}

    def get(key: str) -> Path:
        if key not in built:
            if "@" in key:
                ckpt, what = key.split("@")
                overrides = ["precision.quant=int8_wo"] if what == "tp1_int8" else []
            else:
                ckpt, overrides = ENGINES[key]
            built[key] = build_in_process(checkpoint(ckpt), store, "precision=fp32", "validate.enabled=false",
                                          *overrides)
        return built[key]
    return get


def _reference_key(key: str) -> str:
    ckpt, overrides = ENGINES[RUNS[key][0]]
    return f"{ckpt}@tp1_int8" if "precision.quant=int8_wo" in overrides else f"{ckpt}@tp1"


def _engine_config(engine: Path) -> tuple[ModelSpec, dict, str]:
    cfg = json.loads((engine / ENGINE_JSON).read_text())
    return ModelSpec.from_dict(cfg["spec"]), cfg["mapping"], cfg["quant"]["mode"]


def _prompts(vocab: int, n: int = len(PROMPT_LENS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in PROMPT_LENS][:n]


@torch.inference_mode()
def _outputs(dec: Decoder, prompts: list[list[int]]) -> dict:
    """What every rank returns: all-position logits of the packed batch, and greedy tokens through the
    decoder's cache (prefill, then one decode step per token)."""
    flat, lengths = torch.tensor(sum(prompts, [])), [len(p) for p in prompts]
    score = dec.prefill(flat, lengths, all_logits=True)
    dec.allocate_cache(len(prompts), SEQ)
    logits, pos, tokens = dec.prefill(flat, lengths), torch.tensor(lengths), []
    for step in range(NEW_TOKENS):
        tokens.append(logits.argmax(-1))
        if step + 1 < NEW_TOKENS:
            logits = dec.decode(tokens[-1], pos)
            pos = pos + 1
    return {"score": score, "tokens": torch.stack(tokens, dim=1)}


def _decoder(engine: Path, rank: int = 0, comm: Comm | None = None) -> Decoder:
    spec, mapping, quant = _engine_config(engine)
    tensors = load_file(str(engine / rank_file(rank)))
    layout = RankLayout.of(spec, mapping, rank) if comm is not None else None
    return Decoder(spec, tensors, quant=quant, layout=layout, comm=comm)


def _rank_main(rank: int, tp: int, pp: int, jobs: list[tuple[str, str, int | None, int]], init: str,
               out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=tp * pp)
    try:
        comm = Comm(tp, pp)
        results = {}
        for key, engine, micro_batches, n in jobs:
            dec = _decoder(Path(engine), rank, comm)
            dec.micro_batches = micro_batches  # None: the default ($EF_MICRO_BATCHES, else pp)
            results[key] = _outputs(dec, _prompts(dec.spec.vocab_size, n))
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_world(tp: int, pp: int, jobs: dict[str, tuple[Path, int | None, int]], tmp: Path,
               timeout: float = 120) -> list[dict]:
    """Every rank's outputs for each run of jobs (key -> engine built for tp x pp, micro-batches, prompts), one
    process per rank."""
    import torch.multiprocessing as mp

    tmp.mkdir(parents=True, exist_ok=True)
    runs = [(k, str(e), m, n) for k, (e, m, n) in jobs.items()]
    ctx = mp.start_processes(_rank_main, args=(tp, pp, runs, str(tmp / "init"), str(tmp)), nprocs=tp * pp,
                             join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tp={tp} pp={pp}: the ranks did not finish within {timeout} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(tp * pp)]


WORLDS = {}  # (tp, pp) -> run keys
for _key, (_engine, _, _) in RUNS.items():
    _ov = ENGINES[_engine][1]
    _tp = next((int(o.split("=")[1]) for o in _ov if o.startswith("parallel.tp=")), 1)
    _pp = next((int(o.split("=")[1]) for o in _ov if o.startswith("parallel.pp=")), 1)
    WORLDS.setdefault((_tp, _pp), []).append(_key)


@pytest.fixture(scope="module")
def rank_outputs(engine_dir, tmp_path_factory):
    """rank_outputs(key) -> [outputs of rank r]: one process group per world shape, run when first asked."""
    done: dict[str, list[dict]] = {}

    def get(key: str) -> list[dict]:
        if key not in done:
            world = next(w for w, keys in WORLDS.items() if key in keys)
            outs = _run_world(*world, {k: (engine_dir(RUNS[k][0]), *RUNS[k][1:]) for k in WORLDS[world]},
                              tmp_path_factory.mktemp(f"world-tp{world[0]}-pp{world[1]}"))
            for k in WORLDS[world]:
                done[k] = [o[k] for o in outs]
        return done[key]
    return get


@pytest.fixture(scope="module")
def reference_outputs(engine_dir):
    done = {}

    def get(key: str) -> dict:
        ref, n = _reference_key(key), RUNS[key][2]
        if (ref, n) not in done:
            dec = _decoder(engine_dir(ref))
            done[ref, n] = _outputs(dec, _prompts(dec.spec.vocab_size, n))
        return done[ref, n]
    return get


# ---- multi-rank engines give their tp1 engine's outputs -----------------------------------------------
@pytest.mark.parametrize("key", RUNS)
def test_ranks_match_the_tp1_engine(rank_outputs, reference_outputs, key):
    ranks, want = rank_outputs(key), reference_outputs(key)
    for r, got in enumerate(ranks):  # every rank returns the full logits, the same on every rank
        assert got["score"].dtype == torch.float32 and got["score"].shape == want["score"].shape, r
        assert torch.equal(got["score"], ranks[0]["score"]) and torch.equal(got["tokens"], ranks[0]["tokens"]), r
    assert (ranks[0]["score"] - want["score"]).abs().max().item() <= 1e-4
    assert torch.equal(ranks[0]["tokens"], want["tokens"])


# ---- rank files: only the rank's tensors, reassembling to the tp1 engine's -----------------------------
def _reassemble(name: str, shards: list[torch.Tensor], layouts: list[RankLayout], spec: ModelSpec) -> torch.Tensor:
    """The world-1 tensor from the tp shards of one pipeline stage, by an independent reading of the layout."""
    lay = layouts[0]
    if ".attn.qkv." in name:
        nq, nkv = len(lay.heads), len(lay.kv_heads)
        q, kv = [], {}
        for t, L in zip(shards, layouts):
            unit = t.shape[0] // (nq + 2 * nkv)
            a, k, v = t.split([nq * unit, nkv * unit, nkv * unit])
            q.append(a)
            for j, head in enumerate(L.kv_heads):
                pair = (k[j * unit:(j + 1) * unit], v[j * unit:(j + 1) * unit])
                if head in kv:  # a copied KV head: the same on every rank that holds it
                    assert all(torch.equal(x, y) for x, y in zip(kv[head], pair)), name
                kv[head] = pair
        assert sorted(kv) == list(range(spec.num_kv_heads)), name
        return torch.cat(q + [kv[h][0] for h in sorted(kv)] + [kv[h][1] for h in sorted(kv)])
    if ".mlp.up." in name and spec.mlp == "gated":
        halves = [t.chunk(2) for t in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if ".mlp.up." in name:
        return torch.cat(shards)
    if (".attn.o." in name or ".mlp.down." in name or
            (name == "embed.weight" and lay.embedding_sharding == "hidden")) and shards[0].dim() == 2:
        return torch.cat(shards, dim=1)
    if name.startswith("lm_head.") or (name == "embed.weight" and lay.embedding_sharding == "vocab"):
        full = torch.cat(shards)
        assert full.shape[0] == lay.padded_vocab and not full[spec.vocab_size:].any(), name  # zero padding rows
        return full[:spec.vocab_size]
    assert all(torch.equal(t, shards[0]) for t in shards), name  # replicated
    return shards[0]


@pytest.mark.parametrize("key", ["llama_tp2", "llama_tp4", "llama_tp2_pp2", "llama_tp2_vocab", "llama_tp2_hidden",
                                 "llama_mha_tp2_int8", "gpt2_tp2", "bloom_tp3", "bigcode_tp4"])
def test_rank_files_reassemble_to_the_tp1_engine(engine_dir, key):
    full = load_file(str(engine_dir(_reference_key(key)) / rank_file(0)))
    engine = engine_dir(key)
    spec, mapping, _ = _engine_config(engine)
    tp, pp = mapping["tp"], mapping["pp"]
    layouts = [RankLayout.of(spec, mapping, r) for r in range(tp * pp)]
    ranks = [load_file(str(engine / rank_file(r))) for r in range(tp * pp)]
    seen = {}
    for stage in range(pp):
        lays, files = layouts[stage * tp:(stage + 1) * tp], ranks[stage * tp:(stage + 1) * tp]
        names = set(files[0])
        assert all(set(f) == names for f in files)  # the tp ranks of a stage hold the same names
        assert names == set(rank_tensor_names(lays[0], full))  # ... which the shard plan names
        for name in names:
            seen[name] = _reassemble(name, [f[name] for f in files], lays, spec)
    tied_head = seen.pop("lm_head.weight", None) if spec.tie_word_embeddings else None
    assert set(seen) == set(full)  # every tensor on some stage, and nothing else
    for name, t in seen.items():
        assert torch.equal(t, full[name]), name
    if tied_head is not None:  # a tied model's lm_head, stored by ranks that do not share it: the embedding
        assert torch.equal(tied_head, full["embed.weight"])
    for r, L in enumerate(layouts):  # a stage holds its layers only
        layers = {int(n.split(".")[1]) for n in ranks[r] if n.startswith("layers.")}
        assert layers == set(L.layers)


def test_sharing_the_embedding_makes_the_engine_smaller_by_the_lm_head(engine_dir):
    def tensor_bytes(engine):
        files = [load_file(str(p)) for p in sorted(engine.glob("rank*.safetensors"))]
        return sum(t.numel() * t.element_size() for f in files for t in f.values()), files

    shared, shared_files = tensor_bytes(engine_dir("llama_tp2_share"))
    unshared, unshared_files = tensor_bytes(engine_dir("llama_tp2_vocab"))
    assert all("lm_head.weight" not in f for f in shared_files)
    heads = sum(f["lm_head.weight"].numel() * 4 for f in unshared_files)
    assert heads > 0 and unshared - shared == heads
    for s, u in zip(shared_files, unshared_files):  # the shared table is the vocab slice the lm_head was
        assert torch.equal(s["embed.weight"], u["lm_head.weight"])


def test_build_workers_give_the_same_rank_files(checkpoint, engine_dir, tmp_path):
    again = build_in_process(checkpoint("tiny_llama"), tmp_path / "store", "precision=fp32",
                             "validate.enabled=false", "parallel.tp=2", "parallel.pp=2", "parallel.build_workers=2")
    one = engine_dir("llama_tp2_pp2")
    assert again.name == one.name  # build_workers is not in the hash
    assert rank_digests(again) == rank_digests(one) and len(rank_digests(one)) == 4


# ---- the layout -----------------------------------------------------------------------------------
def _spec(**kw) -> ModelSpec:
    base = dict(family="llama", vocab_size=37, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2,
                intermediate_size=96, max_position_embeddings=64)
    return ModelSpec(**{**base, **kw})


def test_kv_heads_are_copied_when_tp_exceeds_them():
    gqa = [RankLayout.of(_spec(), {"tp": 4}, r) for r in range(4)]
    assert [(L.heads, L.kv_heads, L.kv_replicas) for L in gqa] == [
        (range(0, 2), range(0, 1), 2), (range(2, 4), range(0, 1), 2),
        (range(4, 6), range(1, 2), 2), (range(6, 8), range(1, 2), 2)]
    for L in gqa:  # the rank's KV head is the one its query heads read (group of 8 / 2 = 4 heads)
        assert {h // 4 for h in L.heads} == set(L.kv_heads)
    mqa = [RankLayout.of(_spec(num_kv_heads=1), {"tp": 4}, r) for r in range(4)]
    assert all(L.kv_heads == range(0, 1) and L.kv_replicas == 4 for L in mqa)
    assert [RankLayout.of(_spec(), {"tp": 2}, r).kv_heads for r in range(2)] == [range(0, 1), range(1, 2)]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_alibi_slopes_of_each_rank_are_its_heads_slopes(tp):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    want = build_alibi_tensor(torch.ones(1, 2), 6, torch.float32)[:, 0, 1]  # slope x key position 1
    spec = _spec(num_heads=6, num_kv_heads=6, hidden_size=48, position="alibi")
    got = [RankLayout.of(spec, {"tp": tp}, r).alibi_slopes() for r in range(tp)]
    assert all(s.shape == (6 // tp,) for s in got)
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[-1], want[6 - 6 // tp:], rtol=1e-6, atol=0)
    assert torch.equal(alibi_slopes(6), torch.cat(got))


def test_pipeline_stages_and_rank_order():
    spec = _spec(tie_word_embeddings=True)  # 4 layers
    pp2 = [RankLayout.of(spec, {"tp": 1, "pp": 2}, r) for r in range(2)]
    assert [(L.layers, L.first_stage, L.last_stage) for L in pp2] == [(range(0, 2), True, False),
                                                                      (range(2, 4), False, True)]
    grid = [RankLayout.of(spec, {"tp": 2, "pp": 2}, r) for r in range(4)]  # rank = pp_rank * tp + tp_rank
    assert [(L.tp_rank, L.pp_rank, L.layers) for L in grid] == [
        (0, 0, range(0, 2)), (1, 0, range(0, 2)), (0, 1, range(2, 4)), (1, 1, range(2, 4))]
    names = ["embed.weight", "layers.0.attn.qkv.weight", "layers.3.mlp.down.weight", "final_norm.weight"]
    assert rank_tensor_names(grid[1], names) == ["embed.weight", "layers.0.attn.qkv.weight"]
    # the last stage of a tied model has no embedding: it stores an lm_head of its own
    assert rank_tensor_names(grid[2], names) == ["layers.3.mlp.down.weight", "final_norm.weight", "lm_head.weight"]


def test_vocab_split_pads_to_a_multiple_of_tp():
    spec = _spec(vocab_size=50257)
    lays = [RankLayout.of(spec, {"tp": 2}, r) for r in range(2)]
    assert [L.vocab for L in lays] == [range(0, 25129), range(25129, 50258)]
    w = torch.randn(50257, 3)
    parts = [shard_tensor("lm_head.weight", w, L) for L in lays]
    assert [p.shape for p in parts] == [shard_shape("lm_head.weight", w.shape, L) for L in lays] == [(25129, 3)] * 2
    assert torch.equal(torch.cat(parts)[:50257], w) and not parts[1][-1].any()


def test_quantized_scales_take_their_weights_rule():
    lay = RankLayout.of(_spec(), {"tp": 2}, 1)  # heads 4..7, KV head 1; head_dim 8
    qkv_scale = torch.arange(8 * 8 + 2 * 2 * 8.0)
    got = shard_tensor("layers.0.attn.qkv.scale", qkv_scale, lay)
    assert torch.equal(got, torch.cat([qkv_scale[32:64], qkv_scale[64 + 8:80], qkv_scale[80 + 8:96]]))
    o_scale = torch.arange(64.0)  # per output channel of a row-parallel weight: whole on every rank
    assert torch.equal(shard_tensor("layers.0.attn.o.scale", o_scale, lay), o_scale)
    assert shard_shape("layers.0.attn.o.weight", (64, 64), lay) == (64, 32)
    assert shard_shape("layers.0.attn.o.bias", (64,), lay) == (64,)  # added once, after the all-reduce


# ---- checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, spec_kw, fragments", [
    (["parallel.tp=4"], dict(num_kv_heads=6, num_heads=12), ["parallel.tp=4", "num_key_value_heads=6",
                                                             "or a multiple of 6"]),
    (["parallel.tp=3"], dict(num_kv_heads=2, num_heads=6, intermediate_size=96), ["num_key_value_heads=2"]),
    (["parallel.pp=3"], {}, ["parallel.pp=3", "num_hidden_layers=4"]),
    (["parallel.tp=2", "parallel.share_embedding=true"], dict(tie_word_embeddings=True),
     ["parallel.share_embedding=true", "embedding_sharding=vocab"]),
    (["parallel.tp=2", "parallel.share_embedding=true", "parallel.embedding_sharding=vocab"], {},
     ["parallel.share_embedding=true", "tied embeddings"]),
    (["parallel.tp=4", "parallel.embedding_sharding=hidden"], dict(hidden_size=66, num_heads=4, num_kv_heads=4,
                                                                   intermediate_size=96), ["hidden_size=66"]),
])
def test_check_model_names_the_parallel_rule(overrides, spec_kw, fragments):
    cfg = config.compose(["model.source=dummy", "store=/tmp/unused", *overrides])
    with pytest.raises(UserError) as e:
        check_model(cfg, _spec(**spec_kw))
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("overrides, spec_kw", [
    (["parallel.tp=4"], dict(num_kv_heads=1)),  # MQA: copies
    (["parallel.tp=8"], dict(num_heads=8, num_kv_heads=2, intermediate_size=96)),
    (["parallel.tp=2", "parallel.pp=2", "parallel.embedding_sharding=vocab", "parallel.share_embedding=true"],
     dict(tie_word_embeddings=True)),
])
def test_check_model_accepts_the_new_layouts(overrides, spec_kw):
    check_model(config.compose(["model.source=dummy", "store=/tmp/unused", *overrides]), _spec(**spec_kw))


# ---- micro-batches of pipelined passes ------------------------------------------------------------
@pytest.mark.parametrize("sizes, m, want", [
    ([3, 17, 8, 1], 1, [[0, 1, 2, 3]]),
    ([3, 17, 8, 1], 2, [[0, 1], [2, 3]]),  # 20 | 9 tokens: whole sequences, about half each
    ([3, 17, 8, 1], 3, [[0], [1], [2, 3]]),
    ([3, 17, 8, 1], 9, [[0], [1], [2], [3]]),  # at most one per sequence
    ([100, 1, 1, 1], 3, [[0], [1], [2, 3]]),  # every micro-batch gets at least one
    ([5], 3, [[0]]),
])
def test_micro_batch_groups_are_contiguous_and_balanced(sizes, m, want):
    from runtime.parallel import micro_batch_groups

    assert [list(r) for r in micro_batch_groups(sizes, m)] == want


@pytest.mark.parametrize("value, want", [(None, None), ("", None), ("auto", None), ("3", 3), (" 2", 2)])
def test_micro_batches_setting(monkeypatch, value, want):
    from runtime.parallel import MICRO_BATCHES_ENV, micro_batches_setting

    if value is None:
        monkeypatch.delenv(MICRO_BATCHES_ENV, raising=False)
    else:
        monkeypatch.setenv(MICRO_BATCHES_ENV, value)
    assert micro_batches_setting() == want


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_micro_batches_setting_is_one_line(monkeypatch, value):
    from runtime.parallel import MICRO_BATCHES_ENV, micro_batches_setting

    monkeypatch.setenv(MICRO_BATCHES_ENV, value)
    with pytest.raises(UserError, match=f"EF_MICRO_BATCHES={value!r}: want a whole number"):
        micro_batches_setting()


@pytest.mark.parametrize("key", ENGINES)
def test_every_rank_file_holds_what_the_shard_plan_says(engine_dir, key):
    """The load-time check (runtime/rank_files.py, over headers) accepts every rank of every layout built here
    (int8 scales through the quant mode's stored tensors), and names the rank a file is not."""
    from runtime.errors import EngineError
    from runtime.rank_files import check_rank_file

    engine = engine_dir(key)
    cfg = json.loads((engine / ENGINE_JSON).read_text())
    n = cfg["mapping"]["tp"] * cfg["mapping"]["pp"]
    for r in range(n):
        check_rank_file(engine / rank_file(r), cfg, r)
    if cfg["mapping"]["pp"] > 1:  # another stage's file in rank 0's place
        with pytest.raises(EngineError, match=f"{rank_file(n - 1)}: lacks tensor embed.weight"):
            check_rank_file(engine / rank_file(n - 1), cfg, 0)
