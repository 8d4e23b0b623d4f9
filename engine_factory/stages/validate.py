"""validate: load the engine with the runtime and compare it with a reference (HF transformers in
fp32 where it supports the source): logits error and greedy-token agreement. Writes validation.json
and fails the build when a bound is missed."""
from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from runtime import Engine
from runtime.errors import UserError
from runtime.format import REPORT_MD, VALIDATION_JSON
from runtime.quant import MODES

from ..bounds import check_bounds
from ..hashing import digest
from ..store import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Bounds when the recipe sets none: relative logits error and teacher-forced token agreement.
DEFAULT_BOUNDS = {"fp32": (1e-4, 1.0), "fp16": (2e-2, 0.9), "bf16": (5e-2, 0.8)}
# Quantized weights: by mode, whatever the float dtype (each mode's own: runtime/quant).
QUANT_BOUNDS = {name: m.bounds for name, m in MODES.items() if m.bounds is not None}


class ValidationFailed(UserError):
    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures or []


def validate_key(cfg) -> str:
    """What decides validation's result: the validate group and the recipe's expect.validation bounds."""
    return digest({"validate": OmegaConf.to_container(cfg.validate, resolve=True),
                   "expect": OmegaConf.to_container(cfg.expect, resolve=True).get("validation")})


def _prompt_ids(engine: Engine, vc) -> list[list[int]]:
    if engine.tokenizer is not None:
        return [engine.encode(p) for p in vc.prompts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, engine.spec.vocab_size, (n,), generator=g).tolist() for n in vc.prompt_token_lengths]


def load_reference(engine: Engine, loader, spec=None) -> tuple[object | None, str]:
    """transformers' fp32 model, on the engine's GPU when it fits there (it is loaded in RAM first), or
    (None, why) when it does not fit this machine: a warning and a recorded skip, not an OOM kill. spec: the
    model's (default the engine's, which differs where a tied model's engine has its own quantized lm_head)."""
    from ..resources import available, gib, parameter_count

    need = parameter_count(spec or engine.spec) * 4
    ram = available("cpu")
    if ram is not None and need > ram:
        return None, (f"transformers' fp32 reference needs ~{gib(need)} of RAM and this machine has {gib(ram)} "
                      "available; validate on a larger machine (or set validate=none)")
    ref = loader()
    if engine.device.type == "cuda" and need < (available(engine.device) or 0) * 0.9:
        ref = ref.to(engine.device)
    return ref, ""


@torch.inference_mode()
def _hf_greedy(ref, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt logits (T, V) and n greedy tokens from the transformers model, EOS not special."""
    dev = next(ref.parameters()).device
    with warnings.catch_warnings():  # transformers 5.2x renames past_key_values; older ones lack the new name
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = ref(input_ids=torch.tensor([ids], device=dev), use_cache=True)
        logits, pkv = out.logits[0].float().cpu(), out.past_key_values
        toks = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            out = ref(input_ids=torch.tensor([[toks[-1]]], device=dev), past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            toks.append(int(out.logits[0, -1].argmax()))
    return logits, toks


def parity(engine: Engine, ref, vc) -> dict:
    prompts = _prompt_ids(engine, vc)
    lim = engine.limits  # teacher forcing scores prompt + n - 1 tokens at once: keep within max_input_len
    longest = max(map(len, prompts))
    n = min(vc.max_new_tokens, lim["max_output_len"], lim["max_input_len"] + 1 - longest, lim["max_seq_len"] - longest)
    if n < 1:
        raise UserError(f"validate.prompts: the longest prompt has {longest} tokens, over this "
                        f"engine's max_input_len {lim['max_input_len']}; shorten validate.prompts or raise "
                        "limits.max_input_len")
    max_abs, scale, agree, total, exact = 0.0, 0.0, 0, 0, True
    gens = engine.generate(prompts, max_new_tokens=n, ignore_eos=True)
    per_prompt = []
    for ids, gen in zip(prompts, gens):
        ref_logits, ref_toks = _hf_greedy(ref, ids, n)
        ours = engine.score(ids).cpu()
        d = float((ours - ref_logits).abs().max())
        d = d if math.isfinite(d) else math.inf  # NaN/inf logits must fail, not compare as 0
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


def _task(engine: Engine, ref, tc) -> dict:
    from runtime.summarize import load_articles, pick_style, prompt_budget, summarize

    data = load_articles(tc.dataset, "test", None, ("article", "highlights"), tc.articles)
    style = pick_style(engine.tokenizer, tc.prompt_style)
    out = summarize(engine, data, style, prompt_budget(engine, tc.output_len), tc.output_len, tc.batch_size,
                    hf_model=ref if tc.reference else None)
    task = {"dataset": tc.dataset, "articles": len(data), "prompt_style": style, "output_len": tc.output_len,
            **out["scores"], "seconds": {k: round(v, 2) for k, v in out["seconds"].items()}}
    if "hf" in task:
        task["rouge1_vs_reference"] = task["engine"]["rouge1"] - task["hf"]["rouge1"]
    return task


def validate(engine_dir: Path, source, cfg, name: str | None = None, spec=None) -> dict:
    """Parity (when a reference exists), the summarize task and a speed snapshot (when asked), then the
    bounds: the dtype's parity defaults (or validate.*) and the recipe's expect.validation. spec: the model's
    (the reference's size)."""
    vc, name = cfg.validate, name or engine_dir.name
    rel_bound, agree_bound = QUANT_BOUNDS.get(cfg.precision.quant) or DEFAULT_BOUNDS.get(cfg.precision.dtype, (5e-2, 0.8))
    rel_bound = vc.max_rel_logits if vc.max_rel_logits is not None else rel_bound
    agree_bound = vc.min_token_agreement if vc.min_token_agreement is not None else agree_bound
    result: dict = {"validate_key": validate_key(cfg), "bounds": {"max_rel_logits": rel_bound,
                                                                   "min_token_agreement": agree_bound}}
    failures: list[str] = []
    engine = Engine.load(engine_dir, device=vc.device)
    try:
        ref_loader, why_not = source.reference()
        ref, why_not = load_reference(engine, ref_loader, spec) if ref_loader is not None else (None, why_not)
        if ref is None:
            result["parity"] = {"skipped": why_not}
            log.warning("validate: parity skipped: %s", why_not)
        else:
            t0 = time.perf_counter()
            p = parity(engine, ref, vc)
            p.update(device=str(engine.device), reference_device=str(next(ref.parameters()).device),
                     seconds=round(time.perf_counter() - t0, 2))
            if p["max_rel_logits"] > rel_bound:
                failures.append(f"max_rel_logits {p['max_rel_logits']:.3g} > {rel_bound}")
            if p["token_agreement"] < agree_bound:
                failures.append(f"token_agreement {p['token_agreement']:.3f} < {agree_bound}")
            p["passed"] = not failures
            result["parity"] = p
            log.info("validate: parity max|dlogits|=%.3g (rel %.3g), token agreement %.3f, greedy identical %s",
                     p["max_abs_logits"], p["max_rel_logits"], p["token_agreement"], p["greedy_identical"])
        if vc.task.articles:
            if engine.tokenizer is None:
                raise UserError("validate.task needs a tokenizer; this engine has none (set model.tokenizer=DIR)")
            result["task"] = _task(engine, ref, vc.task)
            log.info("validate: task ROUGE-1 engine %.2f%s", result["task"]["engine"]["rouge1"],
                     f", reference {result['task']['hf']['rouge1']:.2f}" if "hf" in result["task"] else "")
        if vc.speed:
            from runtime.bench import bench

            n_in = min(128, engine.limits["max_input_len"], engine.limits["max_seq_len"] // 2)
            result["speed"] = bench(engine, 1, n_in, min(64, engine.limits["max_seq_len"] - n_in), reps=2)
    finally:  # a multi-rank engine: its local ranks stop here, not at exit
        engine.close()
    failures += check_bounds(result, dict(cfg.expect.get("validation") or {}))
    result["passed"] = not failures
    write_json_atomic(engine_dir / VALIDATION_JSON, result)
    write_text_atomic(engine_dir / REPORT_MD, report_markdown(name, result, failures))
    if failures:
        raise ValidationFailed(f"validation of {name} failed: {'; '.join(failures)}; loosen "
                               "validate.* / expect.validation bounds only if this is expected", failures)
    return result


def report_markdown(name: str, v: dict, failures: list[str]) -> str:
    """A short human summary of validation.json."""
    lines = [f"# Validation of {name}", "", f"**{'passed' if not failures else 'FAILED'}**", ""]
    p = v.get("parity", {})
    if "skipped" in p:
        lines.append(f"- parity: skipped ({p['skipped']})")
    elif p:
        lines.append(f"- parity on {p['device']} vs transformers fp32 on {p.get('reference_device', 'cpu')}: max |Δlogits| {p['max_abs_logits']:.3g} "
                     f"(relative {p['max_rel_logits']:.3g}), teacher-forced token agreement "
                     f"{p['token_agreement']:.3f}, greedy identical over {p['new_tokens']} tokens: "
                     f"{p['greedy_identical']}")
    t = v.get("task")
    if t:
        lines += ["", f"Summarize task: {t['articles']} articles of {t['dataset']}, {t['prompt_style']} prompts, "
                  f"<= {t['output_len']} new tokens", "", "| system | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k} | " + " | ".join(f"{t[k][m]:.2f}" for m in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
                  + " |" for k in ("engine", "hf") if k in t]
    sp = v.get("speed")
    if sp:
        lines += ["", f"Speed on {sp['device']}: {sp['decode_tok_s']} tokens/s decode at batch 1, "
                  f"time to first token {sp['ttft_ms']} ms"]
    lines += [""] + [f"- failed: {f}" for f in failures]
    return "\n".join(lines).rstrip() + "\n"
