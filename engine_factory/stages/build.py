"""build: fuse canonical tensors into the runtime layout, quantize, shard per rank by the one shard plan
(runtime/shard.py) and cast into rank files, add the tokenizer and engine.json, and write the manifest last."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.dtypes import DTYPES
from runtime.errors import UserError
from runtime.kv_cache import KV_FORMATS, SCALE_NAME
from runtime.format import (ENGINE_JSON, FORMAT_VERSION, MANIFEST_JSON, TOKENIZER_DIR, manifest_entries, rank_file,
                            verify_engine)
from runtime.parallel import RankLayout
from runtime.rank_files import quantized_weight
from runtime.shard import rank_tensor_names, shard_shape, shard_tensor
from runtime.spec import ModelSpec

from runtime import quant as quant_modes
from ..safetensors_io import write_streaming
from ..store import write_json_atomic

log = logging.getLogger(__name__)



class _Fused:
    """A world-1 runtime tensor fused along dim 0 from canonical parts (q|k|v, gate|up), read through
    narrow() so that a rank reads only its slices (safetensors get_slice where the source has it)."""

    def __init__(self, tensors, parts: list[str]):
        self.tensors, self.parts = tensors, parts
        shapes = [tuple(tensors.shape(n)) for n in parts]
        self.sizes = [s[0] for s in shapes]
        self.shape = (sum(self.sizes),) + shapes[0][1:]

    def _read(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        if hasattr(self.tensors, "get_slice"):
            return self.tensors.get_slice(name, dim, start, start + length)
        return self.tensors.get(name).narrow(dim, start, length)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim != 0:
            pieces = [self._read(n, dim, start, length) for n in self.parts]
        else:
            pieces, offset = [], 0
            for n, size in zip(self.parts, self.sizes):
                a, b = max(start, offset), min(start + length, offset + size)
                if b > a:
                    pieces.append(self._read(n, 0, a - offset, b - a))
                offset += size
            if not pieces:
                return self._read(self.parts[0], 0, 0, 0)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def whole(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0])


def runtime_parts(spec: ModelSpec, canonical_names) -> dict[str, list[str]]:
    """World-1 runtime name -> the canonical tensors fused into it along dim 0: q/k/v into attn.qkv,
    gate/up into mlp.up, the rest as they are; a tied model's lm_head.weight (stored by ranks whose lm_head
    is not their embedding table, runtime/shard.py rank_tensor_names, and by every last stage of an engine
    that quantizes it: plan.engine_spec) is the embedding."""
    out: dict[str, list[str]] = {}
    for name in canonical_names:
        if ".attn.q." in name:
            out[name.replace(".attn.q.", ".attn.qkv.")] = [name, name.replace(".q.", ".k."), name.replace(".q.", ".v.")]
        elif ".attn.k." in name or ".attn.v." in name or ".mlp.gate." in name:
            continue  # fused with their q / up partner
        elif ".mlp.up." in name:
            out[name] = ([name.replace(".up.", ".gate.")] if spec.mlp == "gated" else []) + [name]
        else:
            out[name] = [name]
    if "lm_head.weight" not in out:  # a tied model (convert gives an untied one its lm_head or fails)
        out["lm_head.weight"] = ["embed.weight"]
    return out


def rank_plan(tensors, spec: ModelSpec, dtype: torch.dtype, layout: RankLayout, quant: str = "none",
              stats: dict | None = None, kv_cache: str = "auto", quant_settings: dict | None = None,
              lm_head: bool = False) -> dict:
    """name -> (shape, dtype, produce) of one rank: the tensors runtime/shard.py gives it, each cut from
    the world-1 runtime tensor (fused from canonical parts) by the shard plan. With a quant mode, the four
    linears of a layer are stored as the mode's tensors (e.g. int8 weight + per-channel scale): the whole
    weight is quantized, then each stored tensor is sharded by the weight's rule (along the dims it
    follows: runtime/quant Stored), so the shards of every rank put together are the world-1 engine's
    tensors and every tp gives the same numbers (checks.py refused partitions a mode cannot take).
    stats: calibration statistics by linear prefix (layers.{i}.attn.qkv), for modes that need them, and
    by layers.{i}.attn (K/V abs-max) for a scaled KV cache, whose [s_k, s_v] every rank stores per layer.
    quant_settings: the mode's precision.* settings (its settings_keys); the mode's prepare() may rewrite
    the world-1 tensors and statistics first (SmoothQuant's smoothing), before anything is cut.
    lm_head: the mode stores the lm_head too (precision.quant_lm_head; spec is the engine's: plan.engine_spec)."""
    mode = quant_modes.get(quant)
    sources = {name: _Fused(tensors, p) for name, p in runtime_parts(spec, tensors.keys()).items()}
    sources, stats = mode.prepare(sources, spec, stats, quant_settings)
    stored: dict[str, tuple] = {}  # stored name -> (world-1 shape, dtype, runtime source name, quant suffix, follows)
    for name, source in sources.items():
        if mode.quantizes and quantized_weight(name, lm_head):
            base = name[:-len("weight")]
            for suffix, st in mode.stored(source.shape, dtype).items():
                stored[base + suffix] = (st.shape, st.dtype, name, suffix, st.follows)
        else:
            stored[name] = (source.shape, dtype, name, None, None)
    virtual = {"lm_head.weight"} if spec.tie_word_embeddings else set()  # not in the world-1 engine
    names = rank_tensor_names(layout, [n for n in stored if n not in virtual])
    memo: dict = {}  # the quantized tensors of one weight, made once for all of its stored parts

    def produce(name: str) -> torch.Tensor:
        _, _, src, suffix, follows = stored[name]
        if suffix is None:
            return shard_tensor(name, sources[src], layout).to(dtype).contiguous()
        if memo.get("src") != src:
            memo.clear()
            linear_stats = (stats or {}).get(src[:-len(".weight")])
            memo.update(src=src, q=mode.quantize(sources[src].whole(), dtype, linear_stats))
        return shard_tensor(name, memo["q"][suffix], layout, follows).contiguous()

    out = {n: (shard_shape(n, stored[n][0], layout, stored[n][4]), stored[n][1], lambda n=n: produce(n))
           for n in names}
    kv = KV_FORMATS[kv_cache]
    if kv.scaled:  # per layer, replicated: from the world-1 calibration, so every tp stores the same scales
        for i in layout.layers:
            absmax = lambda i=i: [float(stats[f"layers.{i}.attn"][s].max()) for s in ("k_absmax", "v_absmax")]
            out[SCALE_NAME.format(i=i)] = ((2,), torch.float32, lambda a=absmax: kv.scales(*a()))
    return out


def _write_rank(tmp: Path, tensors, spec: ModelSpec, dtype, mapping: dict, quant: str, calib: tuple, rank: int,
                progress: bool = True) -> None:
    """calib: (statistics or None, precision.kv_cache, the quant mode's settings, precision.quant_lm_head)."""
    plan = rank_plan(tensors, spec, dtype, RankLayout.of(spec, mapping, rank), quant, *calib)
    with tqdm(total=len(plan), desc=f"build rank{rank}", unit="tensor", leave=False, disable=not progress) as bar:
        write_streaming(tmp / rank_file(rank), plan, metadata={"format": "engine-factory"}, progress=bar)


_JOB: tuple = ()  # what forked build workers inherit (the tensor source holds open files: not pickled)


def _write_rank_in_worker(rank: int, threads: int) -> int:
    torch.set_num_threads(threads)
    _write_rank(*_JOB, rank, progress=False)
    return rank


def _write_ranks(tmp: Path, tensors, spec: ModelSpec, dtype, mapping: dict, quant: str, calib: tuple,
                 workers: int) -> None:
    """Each rank's file by one process of `workers` (forked: they share the source's mapped pages);
    every file depends on its rank only, so the bytes are the same for any worker count."""
    global _JOB
    world = mapping["world_size"]
    workers = max(1, min(workers, world))
    if workers == 1:
        for rank in range(world):
            _write_rank(tmp, tensors, spec, dtype, mapping, quant, calib, rank)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    _JOB = (tmp, tensors, spec, dtype, mapping, quant, calib)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            threads = max(1, (os.cpu_count() or 1) // workers)
            for rank in pool.map(_write_rank_in_worker, range(world), [threads] * world):
                log.info("build: rank %d written", rank)
    except BrokenProcessPool:
        raise UserError(f"a build worker died (out of memory?) while writing {world} rank files with "
                        f"parallel.build_workers={workers}; retry with fewer workers") from None
    finally:
        _JOB = ()


def build(tmp: Path, tensors, spec: ModelSpec, cfg, engine_json: dict, tokenizer_save, calib=None) -> None:
    """spec: the engine's (plan.engine_spec); calib: the calibration statistics (stages/calibrate.py) of
    precisions that need them."""
    mapping = engine_json["mapping"]
    stats = None if calib is None else calib.stats
    p = cfg.precision
    _write_ranks(tmp, tensors, spec, DTYPES[p.dtype], mapping, p.quant,
                 (stats, p.kv_cache, quant_settings(cfg), p.quant_lm_head), int(cfg.parallel.get("build_workers", 1)))
    if tokenizer_save is not None:
        tokenizer_save(tmp / TOKENIZER_DIR)
    write_json_atomic(tmp / ENGINE_JSON, engine_json)
    write_manifest(tmp)


def quant_settings(cfg) -> dict | None:
    """The precision.* settings the quant mode reads (its settings_keys), None for modes without any: part
    of the engine's hash and of engine.json's quant."""
    keys = quant_modes.get(cfg.precision.quant).settings_keys
    if not keys:
        return None
    from omegaconf import OmegaConf

    p = OmegaConf.to_container(cfg.precision, resolve=True)
    return {k: p[k] for k in keys}


def write_manifest(engine_dir: Path) -> None:
    """sha256 + size of engine.json, the mapping's rank files and every tokenizer file, then the check that a
    load makes of the layout (runtime.format.verify_engine), before the manifest's presence commits the build."""
    write_json_atomic(engine_dir / MANIFEST_JSON,
                      {"format_version": FORMAT_VERSION, "files": manifest_entries(engine_dir)})
    verify_engine(engine_dir, "none")
