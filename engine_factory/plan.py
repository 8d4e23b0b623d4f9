"""plan: an engine's memory per rank, from the model's config alone (nothing fetched, nothing built).

Weights come from the build's own rank plan run over shapes (so they are the rank files' sizes, headers
aside); the KV cache from the limits; activations are an estimate of the prefill's largest live tensors for a
full batch of max_input_len prompts, and the largest weight a quantized linear dequantizes whole for a call of
many rows; the workspace a constant per GPU (CUDA context, cuBLAS, graph pools).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

from omegaconf import OmegaConf

from runtime import quant as quant_modes
from runtime.dtypes import DTYPES
from runtime.errors import UserError
from runtime.kv_cache import KV_FORMATS
from runtime.parallel import RankLayout
from runtime.rank_files import quantized_weight

from .layout import canonical_shapes
from .stages.build import rank_plan

# GPU memory of the targets users name most (bytes, as the vendors count: 10^9)
GPUS = {"h100": 80e9, "h200": 141e9, "a100-80gb": 80e9, "a100-40gb": 40e9, "l40s": 48e9, "l4": 24e9,
        "a10g": 24e9, "b200": 180e9, "v100-16gb": 16e9, "v100-32gb": 32e9, "t4": 16e9}
# their compute capability (major * 10 + minor): what a mode's min_sm (fp8: 89) is checked against
GPU_SM = {"h100": 90, "h200": 90, "a100-80gb": 80, "a100-40gb": 80, "l40s": 89, "l4": 89, "a10g": 86, "b200": 100,
          "v100-16gb": 70, "v100-32gb": 70, "t4": 75}
WORKSPACE_BYTES = 1 << 30

log = logging.getLogger(__name__)


def engine_limits(cfg, spec) -> dict:
    """limits.* with max_seq_len = input + output, capped at the model's positions (ALiBi has no cap)."""
    lim = OmegaConf.to_container(cfg.limits, resolve=True)
    seq = lim["max_input_len"] + lim["max_output_len"]
    if spec.position != "alibi" and seq > spec.max_position_embeddings:
        log.info("limits: max_seq_len capped at the model's %d positions", spec.max_position_embeddings)
        seq = spec.max_position_embeddings
    lim["max_seq_len"] = seq
    lim["max_input_len"] = min(lim["max_input_len"], seq)
    return lim


def mapping_of(cfg) -> dict:
    """engine.json's mapping: how the model is cut over ranks."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "world_size": p.tp * p.pp, "embedding_sharding": p.embedding_sharding,
            "share_embedding": p.share_embedding}


def engine_spec(cfg, spec):
    """The engine's spec from the model's: a tied model whose lm_head is quantized (precision.quant_lm_head) stores
    that lm_head as a tensor of its own (the quantized embedding; the embedding itself stays float for the
    lookup), so its engine is untied."""
    if cfg.precision.quant_lm_head and spec.tie_word_embeddings:
        return dataclasses.replace(spec, tie_word_embeddings=False)
    return spec


class _Shapes:
    """A tensor source that has shapes and nothing else: the rank plan runs without reading a weight."""

    def __init__(self, shapes: dict):
        self._shapes = shapes

    def keys(self):
        return list(self._shapes)

    def shape(self, name: str):
        return self._shapes[name]

    def get(self, name: str):
        raise AssertionError(f"the plan reads no weights ({name})")


def gpu_memory(cfg) -> int:
    if cfg.target_gpu_memory_gb:
        return int(cfg.target_gpu_memory_gb * 1e9)
    return int(GPUS[cfg.target_gpu])


def plan(cfg, spec) -> dict:
    """{"ranks": [{rank, params, weight_bytes, kernel_copy_bytes, kv_cache_bytes, activation_bytes, total_bytes},
    ...],
    "gpu_memory_bytes", "fits", "max_batch_size_that_fits"}."""
    lim = engine_limits(cfg, spec)
    mapping = mapping_of(cfg)
    dtype = DTYPES[cfg.precision.dtype]
    act_bytes = dtype.itemsize
    kv_bytes = KV_FORMATS[cfg.precision.kv_cache].bytes_per_element(dtype)  # auto: the activation dtype
    mode = quant_modes.get(cfg.precision.quant)
    shapes = _Shapes(canonical_shapes(spec))
    gpu = gpu_memory(cfg)
    B, T_in, S = lim["max_batch_size"], lim["max_input_len"], lim["max_seq_len"]
    ranks, fit_batch = [], None
    espec = engine_spec(cfg, spec)
    for r in range(mapping["world_size"]):
        layout = RankLayout.of(espec, mapping, r)
        entries = rank_plan(shapes, espec, dtype, layout, cfg.precision.quant, kv_cache=cfg.precision.kv_cache,
                            lm_head=cfg.precision.quant_lm_head)
        weight = sum(math.prod(shape) * dt.itemsize for shape, dt, _ in entries.values())
        # what the mode's CUDA linears hold beside the rank file (int4 in bf16: torch's tinygemm tiles)
        tiles = sum(mode.kernel_copy_bytes(name.rsplit(".", 1)[-1], shape, dt, dtype)
                    for name, (shape, dt, _) in entries.items())
        # parameters: the float layout's elements (a quant mode packs them and adds scales)
        params = sum(math.prod(shape) for shape, _, _ in
                     rank_plan(shapes, spec, dtype, RankLayout.of(spec, mapping, r)).values())
        # the largest weight a quantized linear of the rank may dequantize whole for one call (prefill)
        floats = rank_plan(shapes, espec, dtype, layout) if mode.quantizes else {}
        transient = max((mode.call_bytes(shape, dtype) for n, (shape, _, _) in floats.items()
                         if quantized_weight(n, cfg.precision.quant_lm_head)), default=0)
        hd, nh, nkv = spec.head_dim, len(layout.heads), len(layout.kv_heads)
        kv_seq = 2 * len(layout.layers) * nkv * hd * S * kv_bytes  # K and V of one sequence
        up = (2 if spec.mlp == "gated" else 1) * spec.intermediate_size // layout.tp
        # prefill's live tensors per token: residual and normed input (+ fp32 norm), qkv, attention output,
        # the MLP's up projection and its activation; and the last token's logits in fp32 (local + gathered)
        per_token = spec.hidden_size * (2 * act_bytes + 4) + (nh + 2 * nkv) * hd * act_bytes \
            + nh * hd * act_bytes + (up + up // 2) * act_bytes
        act_seq = T_in * per_token + 2 * layout.padded_vocab * 4
        if spec.position == "alibi":  # the prefill's ALiBi bias of one prompt, (heads, T, T)
            act_seq += nh * T_in * T_in * act_bytes
        total = weight + tiles + B * (kv_seq + act_seq) + transient + WORKSPACE_BYTES
        room = max(0, (gpu - weight - tiles - transient - WORKSPACE_BYTES) // (kv_seq + act_seq))
        fit_batch = room if fit_batch is None else min(fit_batch, room)
        ranks.append({"rank": r, "params": params, "weight_bytes": weight, "kernel_copy_bytes": tiles,
                      "kv_cache_bytes": B * kv_seq,
                      "activation_bytes": B * act_seq + transient + WORKSPACE_BYTES, "total_bytes": total})
    return {"ranks": ranks, "gpu_memory_bytes": gpu, "fits": all(x["total_bytes"] <= gpu for x in ranks),
            "max_batch_size_that_fits": int(fit_batch)}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def describe(cfg, p: dict) -> list[str]:
    """The plan as lines for people, then one JSON line for programs."""
    lim, gpu = cfg.limits, p["gpu_memory_bytes"]
    target = f"target_gpu={cfg.target_gpu}" + (f" ({cfg.target_gpu_memory_gb} GB)" if cfg.target_gpu_memory_gb else "")
    lines = [f"plan: tp={cfg.parallel.tp} pp={cfg.parallel.pp}, {cfg.precision.dtype}"
             f"{'' if cfg.precision.quant == 'none' else ' ' + cfg.precision.quant}, limits {lim.max_batch_size} x "
             f"({lim.max_input_len} in + {lim.max_output_len} out), {target}: {_gb(gpu)} per GPU"]
    for x in p["ranks"]:
        tiles = f" (+ {_gb(x['kernel_copy_bytes'])} of int4 tinygemm tiles)" if x["kernel_copy_bytes"] else ""
        lines.append(f"rank {x['rank']}: {x['params'] / 1e9:.3f} B parameters, weights {_gb(x['weight_bytes'])}{tiles}, "
                     f"KV cache {_gb(x['kv_cache_bytes'])}, activations + workspace {_gb(x['activation_bytes'])}, "
                     f"total {_gb(x['total_bytes'])}")
    worst = max(p["ranks"], key=lambda x: x["total_bytes"])
    verdict = "fits" if p["fits"] else f"does NOT fit (rank {worst['rank']} needs {_gb(worst['total_bytes'])})"
    lines.append(f"{verdict}; the largest limits.max_batch_size that fits: {p['max_batch_size_that_fits']}")
    lines.append(json.dumps(p, sort_keys=True))
    return lines


def check_fits(cfg, spec) -> None:
    """A build for a GPU whose plan does not fit stops before any work, with the plan's numbers."""
    if cfg.target == "cpu":
        return
    p = plan(cfg, spec)
    if p["fits"]:
        return
    worst = max(p["ranks"], key=lambda x: x["total_bytes"])
    n = p["max_batch_size_that_fits"]
    fix = (f"lower limits.max_batch_size to {n}" if n else "raise parallel.tp / parallel.pp") + \
        ", use more ranks, name a larger target_gpu (" + ", ".join(sorted(GPUS)) + "), or target=cpu for a CPU engine"
    raise UserError(f"the plan does not fit target_gpu={cfg.target_gpu} ({_gb(p['gpu_memory_bytes'])}): rank "
                    f"{worst['rank']} needs {_gb(worst['total_bytes'])} (weights {_gb(worst['weight_bytes'])}, KV "
                    f"cache {_gb(worst['kv_cache_bytes'])}); {fix}; `plan=true` prints the whole plan")
