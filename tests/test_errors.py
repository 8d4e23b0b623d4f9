"""Bad inputs end with one clear line on stderr (`error: ...`, naming the input and the fix), a non-zero
exit code, no traceback, and nothing half-written in the store.

stderr may also carry log lines and tqdm bars (which end in carriage returns), so the rule checked is:
among stderr's lines (split at \\n and \\r), exactly one starts with "error:", it is the last non-empty
one, and it contains the given fragments."""
from __future__ import annotations

import shutil

import pytest

from helpers import LIMITS, assert_one_clear_line, assert_store_clean, build_in_process, engines_in

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built_engine(tmp_path_factory, tiny_llama):
    """A good fp32 engine of the tiny LLaMA; tests that damage it work on a copy."""
    return build_in_process(tiny_llama, tmp_path_factory.mktemp("errors-store"), "precision=fp32",
                            "validate.enabled=false")


@pytest.fixture
def engine_copy(built_engine, tmp_path):
    return shutil.copytree(built_engine, tmp_path / built_engine.name)


# ---- the build command line ------------------------------------------------------------------------------
def test_missing_source_path(cli, store, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_clear_line(cli(f"model.source={missing}", f"store={store}"),
                          f"model.source={missing}", "pass a local Hugging Face folder")
    assert_store_clean(store)


def test_no_source_at_all(cli, store):
    assert_one_clear_line(cli(f"store={store}"), "model.source", "recipe=")
    assert_store_clean(store)


def test_unknown_recipe(cli, store):
    assert_one_clear_line(cli("recipe=no_such_recipe", f"store={store}"),
                          "recipe=no_such_recipe", "stories260k_fp32")
    assert not store.exists()


@pytest.mark.parametrize("override, fragments", [
    ("model.foo=1", ("model.foo", "--cfg job")),
    ("precision.dtype=fp8", ("precision.dtype=fp8", "fp16")),
    ("limits.max_batch_size=many", ("limits.max_batch_size=many", "Integer")),
    ("limits.max_batch_size=0", ("limits.max_batch_size=0", "at least 1")),
])
def test_bad_config_value_fails_before_any_work(cli, store, tiny_llama, override, fragments):
    assert_one_clear_line(cli(f"model.source={tiny_llama}", override, f"store={store}"), *fragments)
    assert not store.exists()


def test_bad_point_of_a_sweep_fails_before_any_build(cli, store, tiny_llama):
    result = cli("-m", "precision.dtype=fp32,fp8", f"model.source={tiny_llama}", f"store={store}", *LIMITS)
    assert_one_clear_line(result, "precision.dtype=fp8")
    assert not engines_in(store)


def test_tp_not_dividing_the_heads(cli, store, tiny_llama):
    assert_one_clear_line(cli(f"model.source={tiny_llama}", "parallel.tp=3", f"store={store}", *LIMITS),
                          "parallel.tp=3", "num_attention_heads=8", "1, 2, 4, 8")
    assert_store_clean(store)
    assert not engines_in(store)


def test_tp2_rank_plan_shards_reassemble_to_tp1(tiny_llama, tmp_path):
    """The build's sharding (kept for the parallel runtime): column-parallel qkv / gate-up by heads and
    rows, row-parallel o / down by columns; the shards of tp=2 put back together equal tp=1."""
    import torch

    from engine_factory import families
    from engine_factory.sources.hf_folder import open_folder
    from engine_factory.stages.build import rank_plan
    from runtime.parallel import RankLayout
    from engine_factory.stages.convert import convert
    from engine_factory.store import Store

    store = Store(tmp_path / "store")
    source = open_folder(tiny_llama, store)
    family = families.resolve(source.hf_config)
    spec = family.to_spec(source.hf_config)
    tensors = convert(source, family, spec, store)
    full = {n: p[2]() for n, p in rank_plan(tensors, spec, torch.float32, RankLayout.of(spec, {"tp": 1}, 0)).items()}
    shards = [{n: p[2]() for n, p in rank_plan(tensors, spec, torch.float32, RankLayout.of(spec, {"tp": 2}, r)).items()}
              for r in range(2)]
    q, kv = spec.q_size, spec.kv_size
    for name, t in full.items():
        a, b = shards[0][name], shards[1][name]
        if ".attn.qkv." in name:  # each rank: its q heads, then its k heads, then its v heads
            parts = [x.split([q // 2, kv // 2, kv // 2]) for x in (a, b)]
            t2 = torch.cat([torch.cat([parts[0][i], parts[1][i]]) for i in range(3)])
        elif ".mlp.up." in name:  # each rank: its gate rows, then its up rows
            parts = [x.chunk(2) for x in (a, b)]
            t2 = torch.cat([torch.cat([parts[0][i], parts[1][i]]) for i in range(2)])
        elif (".attn.o." in name or ".mlp.down." in name) and t.dim() == 2:
            t2 = torch.cat([a, b], dim=1)
        else:
            assert torch.equal(a, b), name
            t2 = a
        assert torch.equal(t2, t), name


def test_truncated_safetensors_source(cli, store, tiny_llama, tmp_path):
    src = shutil.copytree(tiny_llama, tmp_path / "truncated")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    assert_one_clear_line(cli(f"model.source={src}", f"store={store}", *LIMITS), str(weights), "re-download")
    assert_store_clean(store)
    assert not engines_in(store)


def test_hub_source_without_a_hub(cli, store):
    line = assert_one_clear_line(cli("model.source=hf://no-org/no-model@main", f"store={store}",
                                     env={"HF_HUB_OFFLINE": "1"}),
                                 "model.source=hf://no-org/no-model@main", "model.source=<local folder>")
    assert "hub" in line
    assert_store_clean(store)


def test_dummy_source_without_an_architecture(cli, store):
    # the message must show an override that works: Hydra only adds keys to model.config with "+"
    assert_one_clear_line(cli("model.source=dummy", f"store={store}"), "model.source=dummy", "+model.config")
    assert_store_clean(store)


def test_validation_failure_keeps_no_engine_and_points_at_the_kept_report(cli, store, tiny_llama):
    # fp16 cannot meet a zero error bound: the build must fail, and say where its report went
    line = assert_one_clear_line(cli(f"model.source={tiny_llama}", "precision=fp16", "validate.max_rel_logits=0",
                                     f"store={store}", *LIMITS), "max_rel_logits")
    assert_store_clean(store)
    assert not engines_in(store)
    (report,) = (store / "failed").glob("*.validation.json")
    assert str(report) in line
    assert ".tmp-" not in line  # the staging folder is gone: do not send the user there


# ---- loading and running an engine ------------------------------------------------------------------------
def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_rank_file_is_refused(run_engine, engine_copy):
    rank = engine_copy / "rank0.safetensors"
    _flip_byte(rank, rank.stat().st_size // 2)  # inside the weights: the header still parses
    assert_one_clear_line(run_engine("--engine_dir", engine_copy, "--input_ids", "1,2,3"), str(rank), "sha256")


@pytest.mark.parametrize("verify", ["full", "none"])
def test_truncated_rank_file_is_refused(run_engine, engine_copy, verify):
    rank = engine_copy / "rank0.safetensors"
    rank.write_bytes(rank.read_bytes()[:1000])
    assert_one_clear_line(run_engine("--engine_dir", engine_copy, "--input_ids", "1,2,3", "--verify", verify),
                          str(rank), "rebuild")


def test_engine_without_manifest_is_refused(run_engine, engine_copy):
    (engine_copy / "manifest.json").unlink()
    assert_one_clear_line(run_engine("--engine_dir", engine_copy, "--input_ids", "1,2,3"),
                          str(engine_copy), "manifest.json", "rebuild")


def test_missing_engine_dir(run_engine, tmp_path):
    missing = tmp_path / "no-such-engine"
    assert_one_clear_line(run_engine("--engine_dir", missing), str(missing), "python -m engine_factory")


def test_text_prompt_for_an_engine_without_tokenizer(run_engine, built_engine):
    assert_one_clear_line(run_engine("--engine_dir", built_engine, "--input_text", "hello"),
                          "no tokenizer", "--tokenizer_dir")


def test_prompt_longer_than_the_engine_allows(run_engine, built_engine):
    ids = ",".join(str(i % 500 + 3) for i in range(65))  # max_input_len is 64
    assert_one_clear_line(run_engine("--engine_dir", built_engine, "--input_ids", ids),
                          "65 tokens", "limits.max_input_len")
