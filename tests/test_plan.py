"""`plan=true`: memory per rank from the model's config alone; a build whose plan does not fit stops before work."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import LIMITS, assert_one_clear_line, build_in_process, engines_in

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(result) -> dict:
    rc, out, err = result
    assert rc == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_plan_needs_only_the_config(cli, store, tiny_llama, tmp_path):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(tiny_llama / "config.json", only_config)  # no weights at all: the plan reads none
    p = _plan(cli(f"model.source={only_config}", f"store={store}", "plan=true", "precision=fp32", *LIMITS))
    (rank,) = p["ranks"]
    assert set(rank) == {"rank", "params", "weight_bytes", "kernel_copy_bytes", "kv_cache_bytes", "activation_bytes",
                         "total_bytes"}
    assert rank["kernel_copy_bytes"] == 0
    assert p["fits"] and p["gpu_memory_bytes"] == 80e9
    # 2 layers x K and V x 2 KV heads x head_dim 8 x 128 positions x fp32, for 4 sequences
    assert rank["kv_cache_bytes"] == 4 * 2 * 2 * 2 * 8 * 128 * 4
    assert not engines_in(store)


@pytest.mark.parametrize("overrides", [
    ["precision=fp16"], ["precision=fp16", "parallel.tp=2"], ["precision=fp16", "parallel.pp=2"],
    # the tied model's embedding also stored as an int8 lm_head of its own, cut by vocabulary
    ["precision=int8_wo", "precision.quant_lm_head=true", "parallel.tp=2"]])
def test_plan_weight_bytes_are_the_rank_files_sizes(overrides, cli, tmp_path, tiny_llama):
    store = tmp_path / "store"
    p = _plan(cli(f"model.source={tiny_llama}", f"store={store}", "plan=true", *overrides, *LIMITS))
    engine = build_in_process(tiny_llama, store, "validate.enabled=false", *overrides)
    for rank in p["ranks"]:
        path = engine / f"rank{rank['rank']}.safetensors"
        with open(path, "rb") as f:  # safetensors: 8 bytes of header length, the header, then the tensors' bytes
            header = 8 + int.from_bytes(f.read(8), "little")
        assert rank["weight_bytes"] == path.stat().st_size - header, rank


def test_a_build_whose_plan_does_not_fit_stops_before_any_work(cli, store, tiny_llama):
    err = assert_one_clear_line(cli(f"model.source={tiny_llama}", f"store={store}", "target_gpu_memory_gb=0.001",
                                    *LIMITS), "the plan does not fit", "rank 0 needs", "plan=true")
    assert "limits.max_batch_size" in err or "parallel.tp" in err
    assert not engines_in(store)
    # the same plan, printed, says so too
    p = _plan(cli(f"model.source={tiny_llama}", f"store={store}", "target_gpu_memory_gb=0.001", "plan=true", *LIMITS))
    assert not p["fits"] and p["max_batch_size_that_fits"] == 0


def test_the_product_cards_70b_plan_fits_an_h100_per_rank(cli, store):
    p = _plan(cli("recipe=llama70b_tp8_fp16", "model.source=dummy", f"store={store}", "plan=true"))
    assert len(p["ranks"]) == 8 and p["fits"]
    # 69.0 B parameters in fp16 over 8 ranks, the embedding replicated on each
    total = sum(r["params"] for r in p["ranks"]) - 7 * 32000 * 8192
    assert abs(total - 68_976_648_192) < 0.001 * total


def test_an_int4_bf16_plan_counts_the_tinygemm_tiles(cli, store, tiny_llama):
    """On a GPU, int4 in bf16 holds torch's tinygemm tiles next to the packed bytes: as many bytes again as the
    packed weights, in the total; fp16 (the Triton kernel only) holds none."""
    plans = {dt: _plan(cli(f"model.source={tiny_llama}", f"store={store}", "plan=true", "precision=int4_wo",
                           f"precision.dtype={dt}", *LIMITS))["ranks"][0] for dt in ("bf16", "fp16")}
    packed = plans["bf16"]["kernel_copy_bytes"]
    assert plans["fp16"]["kernel_copy_bytes"] == 0 and 0 < packed < plans["bf16"]["weight_bytes"]
    assert plans["bf16"]["total_bytes"] - plans["fp16"]["total_bytes"] == packed
