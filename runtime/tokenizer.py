"""Tokenizer loading for engines: the engine's own tokenizer/ folder, or one given by the user."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    """A transformers tokenizer from the files in `path` alone: never the hub, never remote code. (An
    engine's own tokenizer/ is checked by runtime.format.verify_engine first: it holds only listed files.)"""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer folder {path} does not exist; pass --tokenizer_dir with a folder "
                        "holding tokenizer files (tokenizer.json / tokenizer.model / vocab.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable folders
        raise UserError(f"tokenizer folder {path} could not be loaded ({type(e).__name__}: {e}); "
                        "pass --tokenizer_dir with a Hugging Face tokenizer folder") from None
