"""NVIDIA NeMo GPT checkpoints (.nemo, e.g. nvidia/GPT-2B-001): a tar (plain or gzip) of model_config.yaml,
model_weights.ckpt (a torch state dict with Megatron names) and the SentencePiece model that the config's
tokenizer.model names. The weights are extracted once into the store's cache, then read one tensor at a time
(mmap) and mapped by the gpt_next family. No transformers class reads .nemo: validate has no reference."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import torch
import yaml

from runtime.errors import UserError

from . import Source, register_source
from .digests import file_digests
from .meta import sentencepiece_ids, sentencepiece_saver

WEIGHTS = "model_weights.ckpt"
_EMBED = "language_model.embedding.word_embeddings.weight"


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    return {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}


def _read(path: Path, member: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(_members(tar)[member]).read()


def _weights_file(path: Path, sha: str, store) -> Path:
    """model_weights.ckpt extracted into the store (torch.load's mmap needs a file of its own)."""
    out = store.cache_dir("nemo", sha)
    if not (out / WEIGHTS).is_file():
        store.prepare(f"extracting {WEIGHTS} from {path.name}")
        with store.lock(f"nemo-{sha}"):
            if not (out / WEIGHTS).is_file():
                with store.staging(out) as tmp, tarfile.open(path) as tar, open(tmp / WEIGHTS, "wb") as f:
                    shutil.copyfileobj(tar.extractfile(_members(tar)[WEIGHTS]), f, 1 << 24)
    return out / WEIGHTS


def _state_dict(path: Path, sha: str, store) -> dict:
    f = _weights_file(path, sha, store)
    try:  # never unpickle code; mmap: a tensor's pages are read when convert asks for it
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: its {WEIGHTS} cannot be read as a weights-only PyTorch checkpoint ({e})") from None
    return sd.get("state_dict", sd)  # a Lightning checkpoint wraps the state dict


def _tokenizer_member(cfg: dict, members: dict, path: Path) -> str | None:
    """The SentencePiece model that model_config.yaml's tokenizer.model names: 'nemo:<hash>_tokenizer.model' for
    an archived file (GPT-2 BPE models name vocab_file / merge_file instead: pass model.tokenizer for those)."""
    name = str((cfg.get("tokenizer") or {}).get("model") or "")
    hits = [m for m in members if name and Path(m).name == Path(name.removeprefix("nemo:")).name]
    if name.startswith("nemo:") and not hits:
        raise UserError(f"{path}: model_config.yaml names tokenizer {name}, which the archive does not hold")
    return hits[0] if hits else None


def _is_nemo(source: str) -> bool:
    return source.lower().endswith(".nemo") and Path(source).expanduser().is_file()


@register_source(_is_nemo)
def open_nemo(source: str, model_cfg, store) -> Source:
    path = Path(source).expanduser().resolve()
    try:
        with tarfile.open(path) as tar:
            members = _members(tar)
            conf = members.get("model_config.yaml")
            cfg = yaml.safe_load(tar.extractfile(conf)) if conf else None
    except (tarfile.TarError, OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable .nemo archive ({type(e).__name__}: {e}); re-download it") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: no model_config.yaml in the archive; is it a NeMo model?")
    if WEIGHTS not in members:
        seen = sorted({m.split("/")[0] for m in members if "/" in m}) or sorted(members)
        raise UserError(f"{path}: no {WEIGHTS} (it holds {seen[:4]}): tensor-parallel (mp_rank_NN/) and distributed "
                        "(model_weights/) checkpoints are not supported yet; save the model with "
                        "tensor_model_parallel_size=1 and pass that .nemo")
    if cfg.get("mcore_gpt"):
        raise UserError(f"{path}: a Megatron-Core GPT (mcore_gpt: true) uses other tensor names; not supported yet")
    tok = _tokenizer_member(cfg, members, path)
    save_tok = sentencepiece_saver(lambda: _read(path, tok), f"{path}:{tok}", add_bos_token=False) if tok else None
    digests = file_digests([path], path.parent, store)
    sha = digests[path.name]
    sd = _state_dict(path, sha, store)
    embed = next((v for k, v in sd.items() if k.endswith(_EMBED)), None)
    if embed is None:
        raise UserError(f"{path}: {WEIGHTS} has no {_EMBED}; is it a NeMo GPT model?")
    hf_config = {**cfg, "architectures": ["MegatronGPTModel"], "model_type": "gpt_next",
                 "vocab_size": embed.shape[0],  # the tokenizer's vocabulary padded by NeMo
                 **(sentencepiece_ids(_read(path, tok)) if tok else {})}
    return Source(kind="nemo", name=path.stem.lower(), hf_config=hf_config, path=path,
                  provenance={"type": "nemo", "path": str(path), "files": digests},
                  _tensors=lambda: ((k, (lambda v=v: v)) for k, v in sd.items()),
                  save_tokenizer=save_tok,
                  no_reference="NeMo .nemo archives have no transformers reader")
