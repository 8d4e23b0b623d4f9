"""Peak memory of a build, measured: `python tests/perf/build_memory.py --tp 1 --tp 2 --workers 2`.

Writes (once) a LLaMA-2-7B-shaped Hugging Face checkpoint with dummy fp16 values in transformers' own sharded
safetensors layout (model-0000N-of-0000M.safetensors + index), then builds it with `python -m engine_factory`
for each setting and samples the whole process tree (workers included) from /proc every 0.1 s: peak
anonymous memory (RssAnon: what the build itself holds) and peak resident memory (RSS, which also counts
the memory-mapped pages of the source and the converted checkpoint, reclaimable by the kernel).
Not a test (pytest does not collect this folder's files); the README records what it printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def write_checkpoint(folder: Path, shape: dict) -> None:
    """transformers' names and shapes (the model class on the meta device), uniform values, 5 GB shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, torch_dtype="float16", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    config.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            save_file(current, str(folder / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            current, size = {}, 0
    for name, s in shapes.items():
        t = (torch.rand(s, generator=g, dtype=torch.float32) * 0.04 - 0.02).to(torch.float16)
        current[name] = t
        size += t.numel() * 2
        if size >= 5e9:
            flush()
    flush()
    n = len(shards)
    index = {"metadata": {"total_size": sum(t.numel() * 2 for sh in shards for t in sh.values())}, "weight_map": {}}
    for i, sh in enumerate(shards, 1):
        old, new = folder / f"part-{i:05d}.safetensors", folder / f"model-{i:05d}-of-{n:05d}.safetensors"
        old.rename(new)
        index["weight_map"].update({k: new.name for k in sh})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_anon = peak_rss = 0
    while p.poll() is None:
        pids = _tree(p.pid)
        peak_anon = max(peak_anon, sum(_kib(q, "RssAnon") for q in pids))
        peak_rss = max(peak_rss, sum(_kib(q, "VmRSS") for q in pids))
        time.sleep(0.1)
    out = p.stdout.read()
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_anon_gib": round(peak_anon / 2**20, 2), "peak_rss_gib": round(peak_rss / 2**20, 2),
            "engine": out.strip().splitlines()[-1] if out.strip() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default="/tmp/ef-llama7b-hf", help="where the 7B-shaped checkpoint is written")
    ap.add_argument("--store", default="/tmp/ef-build-memory-store")
    ap.add_argument("--tp", type=int, action="append", help="tp of each build (repeatable; default 1 and 2)")
    ap.add_argument("--workers", type=int, default=2, help="also build the last tp with this many build workers")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    write_checkpoint(ckpt, SHAPE)
    runs = [(tp, 1) for tp in (args.tp or [1, 2])]
    if args.workers > 1:
        runs.append((runs[-1][0], args.workers))
    for tp, workers in runs:
        argv = [sys.executable, "-m", "engine_factory", f"model.source={ckpt}", "precision=fp16",
                f"parallel.tp={tp}", f"parallel.build_workers={workers}", "validate.enabled=false",
                f"store={args.store}", "force=true"]
        print(json.dumps({"tp": tp, "build_workers": workers, **measure(argv)}), flush=True)


if __name__ == "__main__":
    main()
