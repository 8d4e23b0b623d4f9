"""A local Hugging Face checkpoint folder: config.json + *.safetensors (or *.bin) + tokenizer files."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from runtime.errors import UserError

from . import TOKENIZER_FILES, Source, read_json, register_source
from .digests import file_digests

log = logging.getLogger(__name__)


def weight_files(path: Path) -> list[Path]:
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    return sorted(p for p in path.glob("*.bin") if p.name not in ("training_args.bin",))


def _iter_safetensors(files: list[Path]):
    from safetensors import safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
            raise UserError(f"{f}: not a readable safetensors file ({e}); re-download or re-save it") from None
        with handle:
            for name in handle.keys():
                yield name, (lambda h=handle, n=name: h.get_tensor(n))


def _iter_bin(files: list[Path]):
    for f in files:
        try:  # never unpickle code: weights_only
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"{f}: cannot be read as a weights-only PyTorch checkpoint ({e}); "
                            "convert it to safetensors") from None
        for name in list(sd):
            yield name, (lambda t=sd[name]: t)


def check_safetensors(files: list[Path]) -> None:
    """Open every header now, so a truncated file fails before any work."""
    for _ in _iter_safetensors_headers(files):
        pass


def _iter_safetensors_headers(files):
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                yield f, list(h.keys())
        except Exception as e:
            raise UserError(f"{f}: not a readable safetensors file ({e}); re-download or re-save it") from None


def open_folder(path: Path, store, provenance_extra: dict | None = None) -> Source:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"model.source={path}: no config.json in this folder; pass a Hugging Face "
                        "checkpoint folder (config.json + *.safetensors)")
    hf_config = read_json(cfg_path, "the model config")
    files = weight_files(path)
    if not files:
        raise UserError(f"model.source={path}: no *.safetensors or *.bin weights in this folder")
    safetensors = files[0].suffix == ".safetensors"
    if safetensors:
        check_safetensors(files)
    tok_files = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    digests = file_digests([cfg_path, *files, *tok_files], path, store)
    provenance = {"type": "hf_folder", "path": str(path), "files": digests, **(provenance_extra or {})}
    tok_cfg = read_json(path / "tokenizer_config.json", "tokenizer config") if (path / "tokenizer_config.json").is_file() else {}
    return Source(kind="hf_folder", name=path.name, hf_config=hf_config, provenance=provenance, path=path,
                  tokenizer_dir=path if tok_files else None, tokenizer_config=tok_cfg,
                  _tensors=lambda: _iter_safetensors(files) if safetensors else _iter_bin(files),
                  _reference=_hf_reference(path, hf_config),
                  no_reference=f"transformers has no model_type {hf_config.get('model_type')!r}")


def _hf_reference(path: Path, hf_config: dict):
    """transformers' own implementation in fp32, where it has one (never remote code)."""
    from transformers import CONFIG_MAPPING

    if hf_config.get("model_type") not in CONFIG_MAPPING:
        return None

    def load():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return load


def _peek(source: str, model_cfg) -> dict | None:
    cfg = Path(source).expanduser() / "config.json"
    return read_json(cfg, "the model config") if cfg.is_file() else None


@register_source(lambda s: Path(s).expanduser().is_dir(), peek=_peek)
def open_local(source: str, model_cfg, store) -> Source:
    return open_folder(Path(source).expanduser().resolve(), store)
