"""validate: load the engine with the runtime and compare it with a reference (HF transformers in
fp32 where it supports the source): logits error and greedy-token agreement. Writes validation.json
and fails the build when a bound is missed."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from runtime import Engine
from runtime.errors import UserError
from runtime.format import VALIDATION_JSON

from ..hashing import digest
from ..store import write_json_atomic

log = logging.getLogger(__name__)

# Bounds when the recipe sets none: relative logits error and teacher-forced token agreement.
DEFAULT_BOUNDS = {"fp32": (1e-4, 1.0), "fp16": (2e-2, 0.9), "bf16": (5e-2, 0.8)}


class ValidationFailed(UserError):
    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures or []


def validate_key(cfg) -> str:
    return digest({"validate": OmegaConf.to_container(cfg.validate, resolve=True)})


def _prompt_ids(engine: Engine, vc) -> list[list[int]]:
    if engine.tokenizer is not None:
        return [engine.encode(p) for p in vc.prompts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, engine.spec.vocab_size, (n,), generator=g).tolist() for n in vc.prompt_token_lengths]


@torch.inference_mode()
def _hf_greedy(ref, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt logits (T, V) and n greedy tokens from the transformers model, EOS not special."""
    out = ref(input_ids=torch.tensor([ids]), use_cache=True)
    logits, pkv = out.logits[0].float(), out.past_key_values
    toks = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        out = ref(input_ids=torch.tensor([[toks[-1]]]), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        toks.append(int(out.logits[0, -1].argmax()))
    return logits, toks


def parity(engine: Engine, ref, vc) -> dict:
    prompts = _prompt_ids(engine, vc)
    n = vc.max_new_tokens
    max_abs, scale, agree, total, exact = 0.0, 0.0, 0, 0, True
    gens = engine.generate(prompts, max_new_tokens=n, ignore_eos=True)
    per_prompt = []
    for ids, gen in zip(prompts, gens):
        ref_logits, ref_toks = _hf_greedy(ref, ids, n)
        ours = engine.score(ids).cpu()
        d = float((ours - ref_logits).abs().max())
        max_abs, scale = max(max_abs, d), max(scale, float(ref_logits.abs().max()))
        # teacher-forced: our argmax along the reference's greedy path
        forced = engine.score(ids + ref_toks[:-1])[len(ids) - 1:].argmax(-1).cpu().tolist()
        a = sum(int(x == y) for x, y in zip(forced, ref_toks))
        agree, total = agree + a, total + n
        same = gen.output_ids == ref_toks
        exact &= same
        per_prompt.append({"prompt_len": len(ids), "max_abs_logits": d, "token_agreement": a / n,
                           "greedy_identical": same})
    return {"max_abs_logits": max_abs, "ref_max_abs_logits": scale, "max_rel_logits": max_abs / max(scale, 1e-12),
            "token_agreement": agree / total, "greedy_identical": exact, "new_tokens": n, "prompts": per_prompt}


def validate(engine_dir: Path, source, cfg) -> dict:
    vc = cfg.validate
    dtype = cfg.precision.dtype
    rel_bound, agree_bound = DEFAULT_BOUNDS.get(dtype, (5e-2, 0.8))
    rel_bound = vc.max_rel_logits if vc.max_rel_logits is not None else rel_bound
    agree_bound = vc.min_token_agreement if vc.min_token_agreement is not None else agree_bound
    result: dict = {"validate_key": validate_key(cfg), "bounds": {"max_rel_logits": rel_bound,
                                                                   "min_token_agreement": agree_bound}}
    ref_loader, why_not = source.reference()
    if ref_loader is None:
        result["parity"] = {"skipped": why_not}
        log.warning("validate: parity skipped: %s", why_not)
    else:
        t0 = time.perf_counter()
        engine = Engine.load(engine_dir, device=vc.device)
        ref = ref_loader()
        p = parity(engine, ref, vc)
        p["device"] = str(engine.device)
        p["seconds"] = round(time.perf_counter() - t0, 2)
        failures = []
        if p["max_rel_logits"] > rel_bound:
            failures.append(f"max_rel_logits {p['max_rel_logits']:.3g} > {rel_bound}")
        if p["token_agreement"] < agree_bound:
            failures.append(f"token_agreement {p['token_agreement']:.3f} < {agree_bound}")
        p["passed"] = not failures
        result["parity"] = p
        log.info("validate: parity max|dlogits|=%.3g (rel %.3g), token agreement %.3f, greedy identical %s",
                 p["max_abs_logits"], p["max_rel_logits"], p["token_agreement"], p["greedy_identical"])
        result["passed"] = not failures
        write_json_atomic(engine_dir / VALIDATION_JSON, result)
        if failures:
            raise ValidationFailed(f"validation of {engine_dir.name} failed: {'; '.join(failures)} (see "
                                   f"{VALIDATION_JSON}); loosen validate.* bounds only if this is expected", failures)
        return result
    result["passed"] = True
    write_json_atomic(engine_dir / VALIDATION_JSON, result)
    return result
