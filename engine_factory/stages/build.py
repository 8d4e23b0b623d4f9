"""build: cast, shard per rank and fuse canonical tensors into rank files (runtime layout), add the
tokenizer and engine.json, and write the manifest last."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.format import ENGINE_JSON, MANIFEST_JSON, TOKENIZER_DIR, manifest_entries, rank_file
from runtime.spec import ModelSpec

from ..quant import QUANTIZERS
from ..safetensors_io import write_streaming
from ..store import write_json_atomic

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _slice(t, how: str, rank: int, tp: int):
    """This rank's part: rows (column-parallel), columns (row-parallel; a 1-D bias stays whole), or all."""
    if how == "row":
        return t.chunk(tp, dim=0)[rank]
    if how == "col" and t.dim() == 2:
        return t.chunk(tp, dim=-1)[rank]
    return t


def rank_plan(tensors, spec: ModelSpec, dtype: torch.dtype, tp: int, rank: int, quant: str = "none") -> dict:
    """name -> (shape, dtype, produce) of rank `rank`: q/k/v fused into attn.qkv and gate/up into
    mlp.up (column-parallel: each rank holds its heads / its slice), attn.o and mlp.down split by
    columns (row-parallel), everything else replicated. With a quant mode, the weights of those four
    linears are stored as the mode's tensors (e.g. int8 weight + per-channel scale), made from this
    rank's slice."""
    plan = {}
    quantizer = QUANTIZERS[quant] if quant != "none" else None

    def put(name, how, parts):
        # parts: canonical names fused along dim 0 after taking this rank's slice of each
        shapes = [_slice(torch.empty(tensors.shape(n), device="meta"), how, rank, tp).shape for n in parts]
        shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])

        def fused():
            return torch.cat([_slice(tensors.get(n), how, rank, tp) for n in parts], dim=0)

        if quantizer is None or how not in ("row", "col") or not name.endswith(".weight"):
            plan[name] = (shape, dtype, lambda: fused().to(dtype).contiguous())
            return
        memo: dict = {}  # the quantized tensors of this weight, made once for all of its stored parts

        def part(suffix):
            if not memo:
                memo.update(quantizer.quantize(fused(), dtype))
            return memo.pop(suffix).contiguous()
        base = name[:-len("weight")]
        for suffix, (qshape, qdtype) in quantizer.shapes(shape, dtype).items():
            plan[base + suffix] = (qshape, qdtype, lambda s=suffix: part(s))

    for name in tensors.keys():
        if ".attn.q." in name:
            put(name.replace(".attn.q.", ".attn.qkv."), "row",
                [name, name.replace(".q.", ".k."), name.replace(".q.", ".v.")])
        elif ".attn.k." in name or ".attn.v." in name or ".mlp.gate." in name:
            continue  # fused with their q / up partner
        elif ".mlp.up." in name:
            put(name, "row", ([name.replace(".up.", ".gate.")] if spec.mlp == "gated" else []) + [name])
        elif ".attn.o." in name or ".mlp.down." in name:
            put(name, "col", [name])
        else:
            put(name, "all", [name])
    return plan


def build(tmp: Path, tensors, spec: ModelSpec, cfg, engine_json: dict, tokenizer_save) -> None:
    dtype = DTYPES[cfg.precision.dtype]
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    for rank in range(tp * pp):
        plan = rank_plan(tensors, spec, dtype, tp, rank % tp, cfg.precision.quant)
        with tqdm(total=len(plan), desc=f"build rank{rank}", unit="tensor", leave=False) as bar:
            write_streaming(tmp / rank_file(rank), plan, metadata={"format": "engine-factory"}, progress=bar)
    if tokenizer_save is not None:
        tokenizer_save(tmp / TOKENIZER_DIR)
    write_json_atomic(tmp / ENGINE_JSON, engine_json)
    write_manifest(tmp)


def write_manifest(engine_dir: Path) -> None:
    from runtime.format import FORMAT_VERSION

    write_json_atomic(engine_dir / MANIFEST_JSON,
                      {"format_version": FORMAT_VERSION, "files": manifest_entries(engine_dir)})
