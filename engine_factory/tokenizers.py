"""The engine's tokenizer/: the source's tokenizer, loaded with transformers and saved in its format."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from runtime.errors import UserError

log = logging.getLogger(__name__)


def tokenizer_saver(source, family, cfg):
    """A function that writes tokenizer/ into the engine, or None when there is no tokenizer."""
    tdir = Path(cfg.model.tokenizer).expanduser() if cfg.model.tokenizer else source.tokenizer_dir
    if source.save_tokenizer is not None and not cfg.model.tokenizer:
        return source.save_tokenizer
    if tdir is None:
        log.warning("no tokenizer in %s: the engine has no tokenizer/ (runtime.run takes --tokenizer_dir)",
                    source.name)
        return None
    if not tdir.is_dir():
        raise UserError(f"model.tokenizer={tdir}: no such folder; pass a folder with tokenizer files")

    def save(dest: Path) -> None:
        import transformers

        cfg_file = tdir / "tokenizer_config.json"
        # an auto_map names remote code (InternLM, Baichuan): never run it; the family's class reads the files
        remote = cfg_file.is_file() and "auto_map" in json.loads(cfg_file.read_text())
        if (cfg_file.is_file() and not remote) or not family.tokenizer_class:
            tok = transformers.AutoTokenizer.from_pretrained(str(tdir), trust_remote_code=False)
        else:  # a bare tokenizer.model / vocab.json, or remote code: the family says which class reads it
            tok = getattr(transformers, family.tokenizer_class).from_pretrained(str(tdir))
            tok.init_kwargs.pop("auto_map", None)  # the engine's copy loads without remote code
        tok.save_pretrained(str(dest))
    return save
