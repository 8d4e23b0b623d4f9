"""The bench table's markdown writer (tests/perf/bench_table.py), the compile cache's folder, and the CPU
decode entry that reads only live positions ("sliced") against the float64 reference."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from runtime.attention import DECODE_ATTENTION, decode_attention, select_decode_attention
from runtime.engine import compile_cache_dir, use_compile_cache
from runtime.model import alibi_slopes
from test_attention import reference

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_table", REPO / "tests" / "perf" / "bench_table.py")
bench_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_table)


def _row(name, case, batch, tok, ttft, input_len=128, **kw):
    return {"kind": "ours", "name": name, "engine_case": case, "batch": batch, "input_len": input_len,
            "output_len": 256, "total_tok_s": tok, "decode_tok_s": tok * 1.1, "ttft_ms": ttft,
            "max_seq_len": 384 if case != "big" else 3072, **kw}


GPU_ROWS = [
    {"kind": "env", "date": "2026-12-02 09:00 UTC", "device": "NVIDIA H200", "torch": "2.11.0", "python": "3.12"},
    _row("bf16 tight", "tight", 1, 290.0, 9.5, startup="cold", first_token_s=70.0, ready_s=95.0),
    _row("bf16 tight", "tight", 64, 9000.0, 170.0, startup="cold"),
    _row("bf16 tight warm", "tight", 1, 288.0, 9.6, startup="warm", first_token_s=12.0, ready_s=18.5),
    _row("big", "big", 1, 280.0, 9.9),
    _row("big", "big", 64, 7000.0, 175.0),
    _row("big", "big", 1, 270.0, 60.0, input_len=2048),
    _row("int8", "int8_tight", 1, 400.0, 9.0),
    {"kind": "peer", "name": "gptfast-bf16", "batch": 1, "input_len": 128, "output_len": 256, "total_tok_s": 220.0},
    {"kind": "peer", "name": "gptfast-bf16", "batch": 64, "input_len": 128, "output_len": 256,
     "total_tok_s": 7300.0},
    {"kind": "skipped", "step": "gptfast-int8", "why": "10 s left, needs ~60 s"},
]


def test_targets_say_met_missed_and_not_measured():
    got = {name.split(" ≥")[0].split(" (")[0]: (measured, verdict) for name, measured, verdict
           in bench_table.targets(GPU_ROWS)}
    assert got["bf16 batch 1"] == ("290.0 tok/s, 1.32× gpt-fast", "met")
    assert got["bf16 batch 64"] == ("9,000.0 tok/s, 1.23× gpt-fast", "missed")
    assert got["limits 3072 vs 384: within 5% at batch 1, 10% at batch 64"][1] == "missed"  # 0.778 at b64
    assert got["long prompt"][1] == "met"  # 297 vs 308 decode tok/s
    assert got["time to first token ≤ 10 ms at batch 1"] == ("9.5 ms", "met")
    assert got["int8_wo batch 1"][1] == "not measured"  # no int8 batch-64 row
    assert "int8_wo with precision.quant_lm_head=true, batch 1" not in got  # its row only where it ran
    head = {n.split(" ≥")[0]: (m, v) for n, m, v in bench_table.targets(GPU_ROWS + [_row("i8h", "int8_head_tight", 1, 500.0, 9.0)])}
    assert head["int8_wo with precision.quant_lm_head=true, batch 1"] == ("1.72×", "met")  # 500 / 290
    assert got["start-up: a second process with --compile reaches its first token in ≤ 20 s"] == \
        ("— s / 12.0 s / 18.5 s", "met")


def test_render_replaces_its_own_section_only(tmp_path):
    gpu, cpu, doc = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl", tmp_path / "benchmarks.md"
    gpu.write_text("".join(json.dumps(r) + "\n" for r in GPU_ROWS))
    cpu.write_text(json.dumps({"kind": "cpu", "model": "stories260K", "impl": "engine-factory (tight)",
                               "input_len": 32, "output_len": 128, "total_tok_s": 500.0, "vs_hf": 2.5}) + "\n")
    bench_table.render([gpu, cpu], doc)
    first = doc.read_text()
    assert first.startswith("# Benchmarks") and first.count("<!-- gpu -->") == first.count("<!-- cpu -->") == 1
    assert "NVIDIA H200" in first and "gptfast-int8: 10 s left" in first and "| stories260K ≥ 2.0× HF generate (eager; --compile)" \
        " | 2.50×; —× | met |" in first
    gpu.write_text("".join(json.dumps(r) + "\n" for r in GPU_ROWS[:1]))  # a later GPU run: its section changes
    bench_table.render([gpu], doc)
    second = doc.read_text()
    assert "gptfast-int8" not in second and second.count("<!-- gpu -->") == 1
    assert second[second.index("<!-- cpu -->"):] == first[first.index("<!-- cpu -->"):]


def test_compile_cache_is_a_user_folder_outside_the_engine(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("EF_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "engine-factory" / "compile"
    monkeypatch.setenv("EF_COMPILE_CACHE", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine" / "triton")


def test_sliced_entry_reads_only_live_positions(one_thread):
    """Positions past the longest live one are NaN: the sliced entry never reads them (the torch entry
    would: NaN * 0 in its masked softmax), and it matches float64 on GQA, MQA and ALiBi; rows all at one
    position without ALiBi (batch 1 always) take SDPA without a mask."""
    assert select_decode_attention(torch.device("cpu"), 64).name == "sliced"
    for B, nh, nkv, S, hd, alibi, same in [(3, 8, 2, 100, 16, False, False), (2, 16, 1, 75, 64, True, False),
                                           (1, 4, 4, 40, 32, True, False), (1, 8, 2, 50, 16, False, True),
                                           (3, 4, 1, 30, 32, False, True)]:
        g = torch.Generator().manual_seed(B)
        q = torch.randn(B, nh, hd, generator=g)
        k, v = torch.randn(B, nkv, S, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g)
        pos = torch.randint(0, S // 2, (B,), generator=g)
        if same:
            pos = pos[:1].expand(B).contiguous()
            assert DECODE_ATTENTION["sliced"].prepare(pos, S, None, q.dtype)[1] is None
        slopes = alibi_slopes(nh) if alibi else None
        ref = reference(q, k, v, pos, hd ** -0.5, slopes)
        k[:, :, int(pos.max()) + 1:] = float("nan")
        v[:, :, int(pos.max()) + 1:] = float("nan")
        out = decode_attention(q, k, v, pos, alibi_slopes=slopes, impl="sliced")
        assert (out.double() - ref).abs().max() < 1e-5


def test_quant_targets_compare_with_bf16_of_the_same_run():
    rows = GPU_ROWS + [_row("int4", "int4_g128_tight", 1, 725.0, 9.0), _row("int4h", "int4_g128_head_tight", 1, 760.0, 9.0),
                       _row("sq", "sq_tight", 64, 10800.0, 150.0),
                       _row("sqkv", "sq_kv8_tight", 64, 11800.0, 140.0),
                       _row("kv", "kv_int8_2x", 64, 8000.0, 170.0, max_seq_len=6144, peak_mem_GB=120.0)]
    got = {name.split(" ≥")[0]: (measured, verdict) for name, measured, verdict in bench_table.quant_targets(rows)}
    assert got["int4_wo_g128 batch 1"] == ("725.0 tok/s = 2.50×", "met")  # 725 / 290
    assert got["int4_wo_g128 + quant_lm_head batch 1"] == ("760.0 tok/s = 2.62×", "met")  # a row of its own
    assert got["SmoothQuant batch 64"] == ("10,800.0 tok/s = 1.20×", "missed")  # 10,800 / 9,000
    assert got["fp8 batch 64"][1] == "not measured"
    assert got["SmoothQuant + int8 KV batch 64"] == ("11,800.0 tok/s = 1.31×", "met")  # a row of its own
    assert got["fp8 + fp8 KV batch 64"][1] == "not measured"
    assert got["int8 KV: batch 64 at twice the max_seq_len bf16 K/V fits"][1] == "met"  # 6144 vs 3072
    # without the big engine's row, the plan of bf16 K/V at the int8 engine's limits decides
    kv_only = [r for r in rows if r.get("engine_case") != "big"]
    for fits, verdict in ((False, "met"), (True, "missed")):
        plan = {"kind": "plan", "name": "bf16 K/V at the int8-KV limits", "fits": fits, "total_GB": 169.3, "gpu_GB": 141.0}
        got = dict((n.split(" ≥")[0], (m, v)) for n, m, v in bench_table.quant_targets(kv_only + [plan]))
        measured, v = got["int8 KV: batch 64 at twice the max_seq_len bf16 K/V fits"]
        assert v == verdict and "169.3 GB" in measured, measured


def test_big_limits_follow_the_card():
    """The long-prompt and int8-KV engines are the largest the plan fits at batch 64 on the card in hand."""
    h100, h200 = bench_table.card_limits(85.0e9), bench_table.card_limits(150.0e9)
    assert (h100["target"], h200["target"]) == ("h100", "h200")
    seq = lambda lim: sum(int(x.split("=")[1]) for x in lim if "max_in" in x or "max_out" in x)  # noqa: E731
    for c in (h100, h200):
        assert seq(c["kv2x"]) == 2 * seq(c["big"]) and f"limits.max_input_len={c['long']}" in c["big"]
    assert seq(h200["big"]) == 3072 and seq(h100["big"]) == 1536


def test_bench_linear_runs_every_path_it_would_time_on_the_gpu(tmp_path):
    """tests/perf/bench_linear.py --dry_run through Triton's interpreter: every mode under auto and library, the
    sweep of each Triton kernel (weight-only and W8A8 / FP8), with no row failed; a broken bench script
    otherwise shows up only when GPU time is spent on it."""
    import os
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; on CPU it runs interpreted)")
    modes = "none,int8_wo,int4_wo_g128,sq_per_token_per_channel,fp8"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "perf" / "bench_linear.py"), "--dry_run", "--out",
                        str(tmp_path), "--modes", modes, "--kernels", "auto,library", "--batches", "1,64", "--sweep",
                        "--sweep_modes", "int4_wo_g128,int8_wo,sq_per_token_per_channel,fp8", "--sweep_batches", "1,64"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "linear.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] in ("failed", "sweep_error")]
    timed = {(r["mode"], r["variant"]) for r in rows if r["kind"] == "linear"}
    assert timed == {("none", "auto")} | {(m, v) for m in modes.split(",")[1:] for v in ("auto", "library")}
    swept = {(r["mode"], r["M"]) for r in rows if r["kind"] == "sweep"}
    assert swept == {(m, M) for m in ("int4_wo_g128", "int8_wo", "sq_per_token_per_channel", "fp8") for M in (1, 64)}


def test_bench_inductor_flags_parse_to_config_values_and_bad_ones_exit_with_one_line(capsys):
    """runtime.bench --inductor KEY=VALUE: Inductor's own config names, values as Python reads them; an unknown
    key, or the flag without --compile, is one line and exit code 2, before any engine is loaded."""
    import pytest

    from runtime.bench import _inductor_option, main

    assert _inductor_option("combo_kernels=true") == ("combo_kernels", True)
    assert _inductor_option(" combo_kernel_max_num_nodes = 4") == ("combo_kernel_max_num_nodes", 4)
    for argv, says in ((["--engine_dir", "nowhere", "--inductor", "combo_kernel=1", "--compile"], "combo_kernel=1"),
                       (["--engine_dir", "nowhere", "--inductor", "combo_kernels=true"], "add --compile")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err
