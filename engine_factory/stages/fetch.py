"""fetch: resolve model.source into a Source (config, provenance with file digests, tensors)."""
from __future__ import annotations

import logging

from runtime.errors import UserError

from ..sources import Source, open_source

log = logging.getLogger(__name__)


def fetch(model_cfg, store) -> Source:
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(model_cfg, "source") or not model_cfg.source:
        raise UserError("model.source is not set; pass model.source=<HF folder | hf://org/name@rev | "
                        "file.gguf | dummy> or recipe=NAME")
    source = open_source(str(model_cfg.source), model_cfg, store)
    if model_cfg.config and source.kind != "dummy":
        source.hf_config = {**source.hf_config, **OmegaConf.to_container(model_cfg.config, resolve=True)}
        source.provenance["config_overrides"] = OmegaConf.to_container(model_cfg.config, resolve=True)
    log.info("fetch: %s (%s)", source.name, source.kind)
    return source
