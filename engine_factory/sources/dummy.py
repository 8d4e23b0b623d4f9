"""dummy: deterministic random weights for an architecture given in model.config (for perf work).

Where transformers has the architecture, the weights are a checkpoint in its own layout (names and
shapes from the model class, built on the meta device): they go through the family's conversion like
any downloaded checkpoint, and validate compares the engine with transformers running the same
weights. Other architectures get canonical tensors directly and no reference.

Every tensor has its own generators seeded from (seed, name, chunk), so the bytes are the same on every
machine (GENERATOR names the scheme; it is part of the engine hash).
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from omegaconf import OmegaConf

from runtime.errors import UserError
from runtime.spec import ModelSpec

from ..layout import canonical_shapes, is_norm
from . import Source, register_source

STD = 0.02
GENERATOR = "uniform-int24-v1"  # change when dummy_tensor's values change
CHUNK = 1 << 22  # normals per generator


def _config(model_cfg) -> dict:
    config = OmegaConf.to_container(model_cfg.config, resolve=True) if model_cfg.config else {}
    if not config:
        raise UserError("model.source=dummy needs the architecture in model.config (HF config.json fields, e.g. "
                        "'+model.config={architectures:[LlamaForCausalLM],hidden_size:...}'), or a model/ option "
                        "that has it")
    return config


@register_source(lambda s: s == "dummy", peek=lambda s, model_cfg: _config(model_cfg))
def open_dummy(source: str, model_cfg, store) -> Source:
    config = _config(model_cfg)
    seed, name = model_cfg.seed, f"dummy-{config.get('model_type', 'model')}"
    shapes = hf_parameter_shapes(config)
    provenance = {"type": "dummy", "seed": seed, "config": config, "layout": "hf" if shapes else "canonical",
                  "generator": GENERATOR}
    if shapes is None:
        return Source(kind="dummy", name=name, hf_config=config, provenance=provenance, canonical=True,
                      no_reference=f"dummy weights of model_type {config.get('model_type')!r}, which transformers "
                                   "does not implement: no reference to compare with")
    return Source(kind="dummy", name=name, hf_config=config, provenance=provenance, lazy=True,
                  _tensors=lambda: ((n, partial(dummy_tensor, seed, n, s)) for n, s in shapes.items()),
                  _reference=partial(reference_model, config, seed, shapes))


def dummy_tensor(seed: int, name: str, shape: tuple[int, ...], norm: bool | None = None) -> torch.Tensor:
    """Weights and biases uniform with standard deviation STD; norm scales 1 + the same (1-D weights are
    norm scales)."""
    t = _uniform(f"{seed}:{name}", math.prod(shape)).view(shape)
    is_scale = norm if norm is not None else (len(shape) == 1 and name.endswith(".weight"))
    return t + 1 if is_scale else t


def _uniform(key: str, n: int) -> torch.Tensor:
    """n values uniform in [-STD√3, STD√3) (standard deviation STD), CHUNK at a time, each chunk from its own
    generator seeded by (key, offset): the same values whatever the number of threads, generated in
    parallel (a 7B model is ~7e9 of them). Made from 24-bit integers and one float multiply, so every CPU
    gives the same bits (torch.randn's float kernels differ between AVX2, AVX512 and ARM builds)."""
    with torch.inference_mode(False):  # the pool's threads are not in the caller's inference mode (calibrate's)
        out = torch.empty(n)
    step = STD * math.sqrt(3) / 2**23

    def fill(start: int) -> None:
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"{key}:{start}".encode()).hexdigest()[:15], 16))
        ints = torch.randint(-2**23, 2**23, (min(CHUNK, n - start),), generator=g, dtype=torch.int32)
        torch.mul(ints.to(torch.float32), step, out=out[start:start + CHUNK])

    starts = range(0, n, CHUNK)
    if len(starts) <= 1:
        if n:
            fill(0)
    else:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(fill, starts))
    return out


def _hf_config(config: dict):
    from transformers import AutoConfig

    rest = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **rest)


def _causal_lm_class(config: dict):
    """transformers' own causal-LM class for this config (never remote code), or None."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        return None
    try:
        hf = _hf_config(config)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"model.config: not a valid {config['model_type']} config for transformers "
                        f"({type(e).__name__}: {e}); fix model.config") from None
    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf), None), hf


def hf_parameter_shapes(config: dict) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of the transformers model's parameters (tied ones once), or None without a class."""
    found = _causal_lm_class(config)
    if not found or found[0] is None:
        return None
    cls, hf = found
    try:
        with torch.device("meta"):
            model = cls(hf)
    except Exception as e:  # noqa: BLE001  (transformers' own checks of the config, any error type)
        raise UserError(f"model.config: transformers cannot build a {config['model_type']} model from it "
                        f"({type(e).__name__}: {e}); fix model.config") from None
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def reference_model(config: dict, seed: int, shapes: dict[str, tuple[int, ...]]):
    """transformers' model in fp32 holding exactly the dummy weights."""
    cls, hf = _causal_lm_class(config)
    state = {n: dummy_tensor(seed, n, s) for n, s in shapes.items()}
    return cls.from_pretrained(None, config=hf, state_dict=state, dtype=torch.float32).eval()


class DummyWeights:
    """Canonical tensors for architectures transformers lacks (a canonical TensorSource)."""

    def __init__(self, spec: ModelSpec, seed: int):
        self.shapes = canonical_shapes(spec)
        self.seed = seed

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return dummy_tensor(self.seed, name, self.shapes[name], norm=is_norm(name) and name.endswith(".weight"))
