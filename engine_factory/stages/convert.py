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
    if source.lazy:
        return LazyConverted(source, family, spec)
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

    for hf_name, load, transform, targets in _mapped(source, family, spec):
        t = load()
        outs = TRANSFORMS[transform](t, spec) if transform else [t]
        for name, tensor in zip(targets, outs):
            _check_shape(source, hf_name, t, name, tensor, expected)
            if name in index or name in pending:
                raise UserError(f"{source.name}: tensor {name} appears twice in the checkpoint")
            pending[name] = tensor.contiguous()
            pending_bytes += tensor.numel() * tensor.element_size()
        if pending_bytes >= SHARD_BYTES:
            flush()
    flush()
    _check_complete(source, expected, index)
    (tmp / INDEX).write_text(json.dumps({"tensors": index}, indent=1, sort_keys=True))


def _mapped(source: Source, family: Family, spec: ModelSpec):
    """(hf_name, load, transform, canonical targets) of each source tensor that carries weights; one
    error naming the tensors the family does not know."""
    unknown: list[str] = []
    for hf_name, load in tqdm(source.tensors(), desc="convert", unit="tensor", leave=False):
        try:
            transform, targets = family.map_name(hf_name, spec)
        except KeyError:
            unknown.append(hf_name)
            continue
        if targets:
            yield hf_name, load, transform, targets
    if unknown:
        raise UserError(f"{source.name}: {len(unknown)} tensors the {family.model_type} family does not know, "
                        f"e.g. {unknown[:3]}; is model.family right for this checkpoint?")


def _check_name(source: Source, hf_name: str, name: str, expected: dict) -> None:
    if name not in expected:
        raise UserError(f"{source.name}: tensor {hf_name} maps to {name}, which a model with this config.json "
                        "does not have; check config.json")


def _check_shape(source: Source, hf_name: str, t: torch.Tensor, name: str, tensor: torch.Tensor,
                 expected: dict) -> None:
    _check_name(source, hf_name, name, expected)
    if tuple(tensor.shape) != expected[name]:
        raise UserError(f"{source.name}: tensor {hf_name} has shape {tuple(t.shape)}, but config.json "
                        f"implies {expected[name]} for {name}; the weights and config.json disagree")


def _check_complete(source: Source, expected: dict, produced) -> None:
    missing = sorted(set(expected) - set(produced))
    if missing:
        raise UserError(f"{source.name}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} "
                        "(truncated or incomplete download?)")


class LazyConverted:
    """A TensorSource converting on demand from a source whose tensors are cheap to recompute (dummy
    weights): the same transforms and checks as a cached conversion, and nothing written to disk."""

    def __init__(self, source: Source, family: Family, spec: ModelSpec):
        self.source, self.spec, self.expected = source, spec, canonical_shapes(spec)
        self.plan: dict[str, tuple] = {}
        for hf_name, load, transform, targets in _mapped(source, family, spec):
            for i, name in enumerate(targets):
                _check_name(source, hf_name, name, self.expected)
                if name in self.plan:
                    raise UserError(f"{source.name}: tensor {name} appears twice in the checkpoint")
                self.plan[name] = (hf_name, load, transform, targets, i)
        _check_complete(source, self.expected, self.plan)
        self._last: tuple = (None, [])

    def keys(self) -> list[str]:
        return list(self.expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.expected[name]

    def get(self, name: str) -> torch.Tensor:
        hf_name, load, transform, targets, i = self.plan[name]
        if self._last[0] != hf_name:  # q, k and v of one fused tensor are asked for in a row
            t = load()
            self._last = (hf_name, TRANSFORMS[transform](t, self.spec) if transform else [t])
            for target, out in zip(targets, self._last[1]):
                _check_shape(self.source, hf_name, t, target, out, self.expected)
        return self._last[1][i]
