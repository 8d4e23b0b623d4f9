"""Tokenizer loading for engines: the engine's own tokenizer/ folder, or one given by the user."""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer folder {path} does not exist; pass --tokenizer_dir with a folder "
                        "holding tokenizer files (tokenizer.json / tokenizer.model / vocab.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for unreadable folders
        raise UserError(f"tokenizer folder {path} could not be loaded ({type(e).__name__}: {e}); "
                        "pass --tokenizer_dir with a Hugging Face tokenizer folder") from None
