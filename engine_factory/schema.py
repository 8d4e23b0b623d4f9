"""Dataclass schemas of every config group, registered in Hydra's ConfigStore.

A key that is not here, or a value of the wrong type, fails at composition, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # local HF folder | hf://org/name@revision | path/to/model.gguf | dummy
    source: str = MISSING
    name: Optional[str] = None  # engine name; default: the recipe name or the source folder's name
    family: Optional[str] = None  # HF model_type; default: detected from config.json's architectures
    version: Optional[str] = None  # family variant where the checkpoint does not say (Baichuan v1/v2)
    tokenizer: Optional[str] = None  # tokenizer folder when the source has none
    config: Dict[str, Any] = field(default_factory=dict)  # HF config fields: dummy architecture / overrides
    seed: int = 0  # dummy weights seed


@dataclass
class PrecisionConfig:
    dtype: str = "fp16"  # fp32 | fp16 | bf16: weights and activations
    quant: str = "none"  # none | int8_wo | int4_wo | int4_wo_g128 | int4_wo_g64 | sq* (a mode of runtime/quant)
    kv_cache: str = "auto"  # auto (the activation dtype) | int8 | fp8 (E4M3): runtime/kv_cache.py, calibrated scales
    # the lm_head quantized too (weight-only modes): fewer bytes a decode step; a tied model's engine then stores
    # the quantized copy of its embedding as its own lm_head (plan.engine_spec)
    quant_lm_head: bool = False
    # SmoothQuant (precision=sq, runtime/quant/sq.py): quant resolves to sq[_per_token][_per_channel]
    sq_alpha: float = 0.5  # migration strength in [0, 1]: s = max|X|^alpha / max|W|^(1 - alpha)
    per_token: bool = False  # activations: one dynamic scale per token (else one static, calibrated, per tensor)
    per_channel: bool = False  # weights: one scale per output channel (else one per tensor)
    sq_smooth: List[str] = field(default_factory=lambda: ["attn.qkv", "mlp.up"])  # the smoothed linears


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    embedding_sharding: str = "none"  # none | vocab | hidden: split the embedding table across tp ranks
    share_embedding: bool = False  # lm_head reuses the (sharded) embedding table (tied models)
    build_workers: int = 1  # processes writing rank files at once (not in the hash: same bytes for any count)


@dataclass
class PluginsConfig:
    cuda_graphs: bool = True  # capture the decode step per batch size on CUDA
    remove_padding: bool = True  # prefill on packed sequences


@dataclass
class CalibrationConfig:
    """Statistics for precisions that need them (precision.kv_cache=int8|fp8): engine_factory/stages/calibrate.py."""
    dataset: Optional[str] = None  # a JSONL file | a `datasets` name | random (token ids); None: no calibration
    samples: int = 64  # windows of seq_len tokens
    seq_len: int = 512
    seed: int = 0  # the order of the records (random: the token ids)
    text_field: str = "article"
    split: str = "test"  # hub datasets only
    config: Optional[str] = None  # hub datasets only (cnn_dailymail: 3.0.0)
    batch_size: int = 8  # samples per prefill
    device: str = "auto"  # auto | cpu | cuda: where the float model runs (fp32 on CPU, precision.dtype on CUDA)


@dataclass
class TaskConfig:
    """The summarize task of validate (the seeds' summarize.py): cnn_dailymail articles, ROUGE."""
    articles: int = 0  # 0: no task
    dataset: str = "${ef.shared:data/cnn_dailymail_test100.jsonl}"  # a JSONL file or a `datasets` name
    output_len: int = 64
    batch_size: int = 8
    prompt_style: str = "auto"  # auto | tldr | chat
    reference: bool = True  # also summarize with the transformers reference (ROUGE side by side)


@dataclass
class ValidateConfig:
    enabled: bool = True
    device: str = "auto"  # auto | cpu | cuda
    prompts: List[str] = field(default_factory=lambda: [
        "Once upon a time", "The capital of France is", "def fibonacci(n):"])
    prompt_token_lengths: List[int] = field(default_factory=lambda: [3, 7, 12])  # for tokenizer-less models
    max_new_tokens: int = 32
    max_rel_logits: Optional[float] = None  # max|engine - ref| / max|ref|; None: by dtype (stages/validate.py)
    min_token_agreement: Optional[float] = None  # fraction of greedy tokens equal to the reference
    task: TaskConfig = field(default_factory=TaskConfig)
    speed: bool = False  # a speed snapshot (runtime.bench: batch 1, 128 in / 64 out)


@dataclass
class LimitsConfig:
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 512


@dataclass
class EngineFactoryConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    backend: str = "torch"
    target: str = "any"  # any | cpu | cuda: where the engine may run
    store: str = MISSING
    expect: Dict[str, Any] = field(default_factory=dict)  # published results a recipe records
    force: bool = False  # rebuild even when the engine is in the store
    plan: bool = False  # print the memory plan per rank (from the model's config alone) and stop
    target_gpu: str = "h100"  # the GPU the plan is checked against (engine_factory/plan.py GPUS)
    target_gpu_memory_gb: Optional[float] = None  # its memory, for a GPU not in that table
    verify: str = "size"  # size | full: how a cache hit checks the engine in the store (full: sha256 of every file)
    log_level: str = "INFO"


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=EngineFactoryConfig)
    for group, node in (("model", ModelConfig), ("precision", PrecisionConfig), ("parallel", ParallelConfig),
                        ("plugins", PluginsConfig), ("calibration", CalibrationConfig),
                        ("validate", ValidateConfig)):
        cs.store(group=group, name="schema", node=node)
