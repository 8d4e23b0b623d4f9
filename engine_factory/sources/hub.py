"""hf://org/name@revision: a snapshot from the Hugging Face hub (huggingface_hub), pinned by revision."""
from __future__ import annotations

import logging
from pathlib import Path

from runtime.errors import UserError

from . import Source, register_source
from .hf_folder import open_folder

log = logging.getLogger(__name__)

_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


@register_source(lambda s: s.startswith("hf://"))
def open_hub(source: str, model_cfg, store) -> Source:
    ref = source[len("hf://"):]
    repo_id, _, revision = ref.partition("@")
    if not revision:
        log.warning("%s has no @revision: using 'main', which can change; pin a commit for reproducible builds",
                    source)
        revision = "main"
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated model: all end here with the hub's reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # its first sentence
        raise UserError(f"model.source={source}: cannot fetch from the Hugging Face hub ({type(e).__name__}: "
                        f"{reason}); the hub may be unreachable from this machine: download the model where "
                        "it is reachable and pass model.source=<local folder>") from None
    path = Path(folder)
    commit = path.name  # snapshots/<commit sha>
    return open_folder(path, store, {"type": "hf_hub", "repo_id": repo_id, "revision": revision,
                                     "commit": commit, "cache_path": str(path)})
