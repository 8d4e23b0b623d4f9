"""convert: stream the source's tensors through the family's name map and transforms into the
canonical layout, cached in the store by the hash of (source digest, family, spec)."""
from __future__ import annotations

import json
import logging

import torch
from tqdm import tqdm

from runtime.errors import UserError
from runtime.spec import ModelSpec

from ..families.base import TRANSFORMS, Family
from ..hashing import digest
from ..layout import canonical_shapes
from ..safetensors_io import write_streaming
from ..sources import Source
from ..sources.dummy import DummyWeights
from ..tensors import INDEX, ShardedCheckpoint

log = logging.getLogger(__name__)

CONVERT_VERSION = 1
SHARD_BYTES = 1 << 30


def convert(source: Source, family: Family, spec: ModelSpec, store):
    if source.canonical:
        return DummyWeights(spec, source.provenance["seed"])
    key = digest({"source": source.digest, "family": family.model_type, "spec": spec.to_dict(),
                  "version": CONVERT_VERSION})
    out = store.cache_dir("convert", key)
    if (out / INDEX).is_file():
        log.info("convert: cached %s", out)
        return ShardedCheckpoint(out)
    with store.lock(f"convert-{key}"):
        if not (out / INDEX).is_file():
            with store.staging(out) as tmp:
                _convert_into(tmp, source, family, spec)
    return ShardedCheckpoint(out)


def _convert_into(tmp, source: Source, family: Family, spec: ModelSpec) -> None:
    expected = canonical_shapes(spec)
    index: dict[str, dict] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    unknown: list[str] = []

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        fname = f"shard-{len({e['file'] for e in index.values()}):05d}.safetensors"
        plan = {n: (tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in pending.items()}
        write_streaming(tmp / fname, plan)
        for n, t in pending.items():
            index[n] = {"file": fname, "shape": list(t.shape), "dtype": str(t.dtype)}
        pending, pending_bytes = {}, 0

    for hf_name, load in tqdm(source.tensors(), desc="convert", unit="tensor", leave=False):
        try:
            transform, targets = family.map_name(hf_name, spec)
        except KeyError:
            unknown.append(hf_name)
            continue
        if not targets:
            continue
        t = load()
        outs = TRANSFORMS[transform](t, spec) if transform else [t]
        for name, tensor in zip(targets, outs):
            if name not in expected:
                raise UserError(f"{source.name}: tensor {hf_name} maps to {name}, which a {family.model_type} "
                                f"model with this config.json does not have; check config.json")
            if tuple(tensor.shape) != expected[name]:
                raise UserError(f"{source.name}: tensor {hf_name} has shape {tuple(t.shape)}, but config.json "
                                f"implies {expected[name]} for {name}; the weights and config.json disagree")
            if name in index or name in pending:
                raise UserError(f"{source.name}: tensor {name} appears twice in the checkpoint")
            pending[name] = tensor.contiguous()
            pending_bytes += tensor.numel() * tensor.element_size()
        if pending_bytes >= SHARD_BYTES:
            flush()
    flush()
    if unknown:
        raise UserError(f"{source.name}: {len(unknown)} tensors the {family.model_type} family does not know, "
                        f"e.g. {unknown[:3]}; is model.family right for this checkpoint?")
    missing = sorted(set(expected) - set(index))
    if missing:
        raise UserError(f"{source.name}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} "
                        "(truncated or incomplete download?)")
    (tmp / INDEX).write_text(json.dumps({"tensors": index}, indent=1, sort_keys=True))
