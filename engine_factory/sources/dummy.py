"""dummy: deterministic random weights for an architecture given in model.config (for perf work)."""
from __future__ import annotations

import hashlib

import torch
from omegaconf import OmegaConf

from runtime.errors import UserError
from runtime.spec import ModelSpec

from ..layout import canonical_shapes, is_norm
from . import Source, register_source


@register_source(lambda s: s == "dummy")
def open_dummy(source: str, model_cfg, store) -> Source:
    config = OmegaConf.to_container(model_cfg.config, resolve=True) if model_cfg.config else {}
    if not config:
        raise UserError("model.source=dummy needs the architecture in model.config (HF config.json fields, e.g. "
                        "'+model.config={architectures:[LlamaForCausalLM],hidden_size:...}'), or a model/ option "
                        "that has it")
    return Source(kind="dummy", name=f"dummy-{config.get('model_type', 'model')}", hf_config=config,
                  provenance={"type": "dummy", "seed": model_cfg.seed, "config": config}, canonical=True,
                  no_reference="dummy weights: no reference checkpoint to compare with")


class DummyWeights:
    """A canonical TensorSource whose tensors are N(0, 0.02) (norms: 1, biases: 0), the same bytes
    on every machine: each tensor has its own generator seeded from (seed, name)."""

    def __init__(self, spec: ModelSpec, seed: int):
        self.shapes = canonical_shapes(spec)
        self.seed = seed

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if is_norm(name):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"{self.seed}:{name}".encode()).hexdigest()[:15], 16))
        return torch.randn(shape, generator=g) * 0.02
