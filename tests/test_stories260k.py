"""Golden test on a real trained model: llama2.c's stories260K, built from its published recipe in fp32,
must reproduce llama2.c's own greedy output byte for byte."""
from __future__ import annotations

import json

from helpers import engine_path


def test_stories260k_fp32_reproduces_llama2c(need_shared, cli, run_engine, store):
    reference = need_shared("models/stories260K/reference_greedy.txt").read_bytes()
    engine = engine_path(cli("recipe=stories260k_fp32", f"store={store}"))
    assert json.loads((engine / "validation.json").read_text())["parity"]["passed"]
    rc, out, err = run_engine("--engine_dir", engine, "--input_text", "Once upon a time",
                              "--max_output_len", 196, "--temperature", 0, raw=True)
    assert rc == 0, err
    assert out == reference
