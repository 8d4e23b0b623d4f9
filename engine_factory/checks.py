"""Checks of config combinations, before any work: each failure names the keys and the fix."""
from __future__ import annotations

from runtime.dtypes import DTYPES
from runtime.errors import UserError
from runtime.kv_cache import KV_FORMATS
from runtime.quant import MODES
from runtime.spec import ModelSpec

from .plan import GPU_SM, GPUS
from .store import check_name
from .stages.calibrate import NEEDS_CALIBRATION, check_calibration

QUANT_MODES = set(MODES) | NEEDS_CALIBRATION
# the four linears of a layer: (name, in_features of spec, whether row-parallel: its input split over tp)
_LINEAR_INPUTS = (("attn.qkv", lambda s: s.hidden_size, False), ("attn.o", lambda s: s.num_heads * s.head_dim, True),
                  ("mlp.up", lambda s: s.hidden_size, False), ("mlp.down", lambda s: s.intermediate_size, True))
BACKENDS = {"torch"}
TARGETS = {"any", "cpu", "cuda"}


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value} is not one of {', '.join(sorted(map(str, allowed)))}")


def check_config(cfg) -> None:
    """What can be checked from the config alone."""
    _one_of("precision.dtype", cfg.precision.dtype, DTYPES)
    _one_of("precision.quant", cfg.precision.quant, QUANT_MODES)
    _one_of("precision.kv_cache", cfg.precision.kv_cache, KV_FORMATS)
    _one_of("backend", cfg.backend, BACKENDS)
    _one_of("target", cfg.target, TARGETS)
    _one_of("verify", cfg.verify, {"size", "full"})
    _one_of("target_gpu", cfg.target_gpu, GPUS)
    if cfg.target_gpu_memory_gb is not None and not cfg.target_gpu_memory_gb > 0:
        raise UserError(f"target_gpu_memory_gb={cfg.target_gpu_memory_gb} must be a positive number of GB")
    if cfg.model.name is not None:
        check_name("model.name", cfg.model.name)
    for key in ("tp", "pp", "build_workers"):
        if cfg.parallel[key] < 1:
            raise UserError(f"parallel.{key}={cfg.parallel[key]} must be at least 1")
    _one_of("parallel.embedding_sharding", cfg.parallel.embedding_sharding, {"none", "vocab", "hidden"})
    lim = cfg.limits
    for key in ("max_batch_size", "max_input_len", "max_output_len"):
        if lim[key] < 1:
            raise UserError(f"limits.{key}={lim[key]} must be at least 1")
    _check_quant_settings(cfg)
    _check_quant_lm_head(cfg)
    _check_target_sm(cfg)
    check_calibration(cfg)  # a precision that calibrates has a usable calibration set


def _check_quant_settings(cfg, spec: ModelSpec | None = None) -> None:
    """A mode's precision.* settings are valid (for the model, with spec), and no other mode's setting is
    changed from its default (precision=int8_wo precision.per_token=true would otherwise be silently ignored)."""
    from omegaconf import OmegaConf

    from .schema import PrecisionConfig

    mode, p, default = MODES[cfg.precision.quant], OmegaConf.to_container(cfg.precision, resolve=True), PrecisionConfig()
    for key in sorted({k for m in MODES.values() for k in m.settings_keys} - set(mode.settings_keys)):
        if p[key] != getattr(default, key):
            owner = next(m.name for m in MODES.values() if key in m.settings_keys)
            raise UserError(f"precision.{key}={p[key]} is a setting of precision.quant={owner}, not of "
                            f"{cfg.precision.quant}; drop it, or use precision={owner}")
    problem = mode.check({k: p[k] for k in mode.settings_keys}, spec)
    if problem:
        raise UserError(problem)


def _check_quant_lm_head(cfg) -> None:
    """precision.quant_lm_head=true: a mode that can take the lm_head (weight-only), without the float embedding
    table as the lm_head (share_embedding). (Its groups fit: its input features are attn.qkv's, checked with the
    model's shape by _check_quant_partition.)"""
    if not cfg.precision.quant_lm_head:
        return
    quant, mode = cfg.precision.quant, MODES[cfg.precision.quant]
    weight_only = ", ".join(sorted(m for m, x in MODES.items() if x.lm_head))
    if not mode.lm_head:
        why = ("stores every weight in precision.dtype" if not mode.quantizes else
               "quantizes activations with statistics calibrated at the four linears of each layer, none at the "
               "lm_head's input")
        raise UserError(f"precision.quant_lm_head=true: precision.quant={quant} {why}; drop precision.quant_lm_head, "
                        f"or use a weight-only precision ({weight_only})")
    if cfg.parallel.share_embedding:
        raise UserError("precision.quant_lm_head=true stores the lm_head as its own quantized tensor, and "
                        "parallel.share_embedding=true makes the float embedding table the lm_head: drop one of them")


def _check_target_sm(cfg) -> None:
    """A mode that needs a newer GPU (fp8: sm >= 89) than target_gpu, for an engine that may run on CUDA."""
    need = getattr(MODES.get(cfg.precision.quant), "min_sm", None)
    if need is None or cfg.target == "cpu" or GPU_SM[cfg.target_gpu] >= need:
        return
    fits = ", ".join(g for g in sorted(GPUS) if GPU_SM[g] >= need)
    raise UserError(f"precision.quant={cfg.precision.quant} needs a GPU with compute capability >= {need // 10}.{need % 10} "
                    f"and target_gpu={cfg.target_gpu} is {GPU_SM[cfg.target_gpu] // 10}.{GPU_SM[cfg.target_gpu] % 10}; "
                    f"name target_gpu={fits.replace(', ', '|')}, or build precision=int8_wo for it, or target=cpu")


def check_model(cfg, spec: ModelSpec) -> None:
    """What needs the model's shape: parallel splits, limits against positions."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    for what, n in (("num_attention_heads", spec.num_heads), ("intermediate_size", spec.intermediate_size),
                    ("num_key_value_heads", spec.num_kv_heads)):
        if what == "num_key_value_heads" and n < tp and tp % n == 0:
            continue  # fewer KV heads than ranks (MQA, GQA): the ranks of one KV head each keep a copy
        if n % tp:
            also = f", or a multiple of {n}" if what == "num_key_value_heads" else ""
            raise UserError(f"parallel.tp={tp} does not divide the model's {what}={n}; choose a tp that "
                            f"divides it ({', '.join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)}"
                            f"{also})")
    sharding = cfg.parallel.embedding_sharding
    if sharding == "hidden" and spec.hidden_size % tp:
        raise UserError(f"parallel.embedding_sharding=hidden: parallel.tp={tp} does not divide hidden_size="
                        f"{spec.hidden_size}; use embedding_sharding=vocab")
    if cfg.parallel.share_embedding and not spec.tie_word_embeddings:
        raise UserError("parallel.share_embedding=true needs a model with tied embeddings "
                        "(tie_word_embeddings); this one has a separate lm_head: drop it")
    if cfg.parallel.share_embedding and sharding != "vocab":
        raise UserError(f"parallel.share_embedding=true needs parallel.embedding_sharding=vocab (the lm_head's "
                        f"vocab slice is the embedding's), not {sharding}; set embedding_sharding=vocab")
    if spec.num_layers % pp:
        raise UserError(f"parallel.pp={pp} does not divide num_hidden_layers={spec.num_layers}")
    _check_quant_partition(cfg.precision.quant, spec, tp)
    _check_quant_settings(cfg, spec)


def _check_quant_partition(quant: str, spec: ModelSpec, tp: int) -> None:
    """Each linear's rank partition must suit the quant mode (a group must not straddle two ranks)."""
    mode = MODES.get(quant)
    if mode is None or not mode.quantizes:
        return

    def fits(m, t: int) -> bool:
        return all(m.partition_problem((0, f(spec)), f(spec) // t if r else f(spec)) is None
                   for _, f, r in _LINEAR_INPUTS)

    for lin, in_of, row in _LINEAR_INPUTS:
        inp = in_of(spec)
        problem = mode.partition_problem((0, inp), inp // tp if row else inp)
        if problem is None:
            continue
        family = quant.split("_g")[0]  # int4_wo_g128 -> its siblings int4_wo, int4_wo_g64
        other = [m for m in sorted(MODES, key=lambda m: -(getattr(MODES[m], "group_size", 0) or 0))
                 if m != quant and m.split("_g")[0] == family and fits(MODES[m], tp)]
        fixes = [f"use precision={other[0]}"] if other else []
        tps = [t for t in range(tp - 1, 0, -1) if spec.num_heads % t == 0 and fits(mode, t)]
        if tp > 1 and tps:
            fixes.append(f"parallel.tp={tps[0]}")
        where = f" (row-parallel: in_features / tp={tp})" if row and tp > 1 else ""
        raise UserError(f"precision.quant={quant}: layers.*.{lin}.weight{where}: {problem}; "
                        f"{' or '.join(fixes) or 'use another precision'}")
