"""Checkpoint sources: where a model's config, weights and tokenizer come from.

`open_source(spec_string, ...)` picks a reader from SOURCES by the form of model.source.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from runtime.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class Source:
    kind: str
    name: str  # default engine name
    hf_config: dict
    provenance: dict  # recorded in engine.json: path or hub id + revision, sha256 of each file
    canonical: bool = False  # tensors already use canonical names (dummy weights)
    lazy: bool = False  # tensors are cheap to recompute (dummy weights): converted on demand, not cached
    path: Path | None = None
    tokenizer_dir: Path | None = None
    tokenizer_config: dict = field(default_factory=dict)
    _tensors: Callable[[], Iterator[tuple[str, Callable[[], torch.Tensor]]]] | None = None
    _reference: Callable[[], object] | None = None  # loads the fp32 reference model for validate
    no_reference: str = "this source has no reference model"
    save_tokenizer: Callable[[Path], None] | None = None  # for sources whose tokenizer is not a folder

    @property
    def digest(self) -> dict:
        """What identifies the bytes of this source (no paths)."""
        return {k: v for k, v in self.provenance.items() if k not in ("path", "cache_path")}

    def reference(self) -> tuple[Callable[[], object] | None, str]:
        """(loader of a transformers model in fp32, or None, and why not)."""
        return self._reference, self.no_reference

    def tensors(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        """(name, load) pairs, loaded one at a time by the caller."""
        return self._tensors()


# Readers by the form of model.source, tried in order: (matches(source_string), open(...), peek(...) or None).
# peek(source_string, model_cfg) returns the HF config fields alone, cheaply (no weights read, nothing written):
# what the checks before any work need, e.g. for every point of a sweep before the first one builds.
SOURCES: list[tuple[Callable[[str], bool], Callable[..., Source], Callable[..., dict] | None]] = []


def register_source(matches: Callable[[str], bool], first: bool = False, peek: Callable[..., dict] | None = None):
    """first: try before the readers registered so far (a specific folder layout before any folder)."""
    def deco(fn):
        SOURCES.insert(0 if first else len(SOURCES), (matches, fn, peek))
        return fn
    return deco


def _register_all() -> None:
    from . import dummy, hf_folder, hub, meta, nemo, pypi  # noqa: F401  (register themselves)
    try:
        from . import gguf  # noqa: F401
    except ImportError:
        pass


def open_source(source: str, model_cfg, store) -> Source:
    _register_all()
    for matches, fn, _ in SOURCES:
        if matches(source):
            return fn(source, model_cfg, store)
    raise UserError(f"model.source={source}: no such file or folder; pass a local Hugging Face folder "
                    "(config.json + weights), hf://org/name@revision, a Meta checkpoint folder (params.json + "
                    "consolidated.*.pth), a .nemo file, a .gguf file, or dummy")


def peek_config(source: str, model_cfg) -> dict | None:
    """The source's HF config without reading weights, or None where only fetching can tell (the hub)."""
    _register_all()
    for matches, _, peek in SOURCES:
        if matches(source):
            return peek(source, model_cfg) if peek else None
    return None


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what} ({e}); check the file") from None
