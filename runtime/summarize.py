"""python -m runtime.summarize: ROUGE of an engine, and of the Hugging Face model it came from, on
cnn_dailymail (the seeds' summarize.py), for every family.

Prompts: `tldr` is the seeds' "<article> TL;DR:"; `chat` wraps the article in the chat template that
the tokenizer carries ("Summarize the following article ..."); `auto` takes chat when there is one.
The article's tokens are cut so that the whole prompt fits --max_input_len (the seeds cut the end of
the prompt, TL;DR included). Both systems get the same token ids, decode greedily to EOS or
--output_len, and go through the same clean-up: strip, and for tldr keep only the first paragraph (a
base model goes on past its summary after a blank line). ROUGE F-measures in percent are averaged;
for ROUGE-Lsum, sentences are put on lines of their own. The last stdout line is JSON:
{"engine": {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...}, "hf": {...}}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from . import params
from .cli import setup_logging, user_errors_exit
from .engine import Engine
from .errors import UserError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TLDR = " TL;DR:"  # the seeds' ' TL;DR: ', which they strip() before encoding
CHAT_PROMPT = "Summarize the following article in a few sentences:\n\n{article}"
HUB_CONFIGS = {"cnn_dailymail": "3.0.0", "abisee/cnn_dailymail": "3.0.0"}


def parse_args(argv=None):
    count = params.flag("count")
    p = params.ArgumentParser(prog="python -m runtime.summarize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine_dir", required=True)
    p.add_argument("--hf_model_dir", default=None, help="HF folder or .gguf file for --test_hf "
                   "(default: the engine's source, when it is a local path)")
    p.add_argument("--dataset", required=True, help="a JSONL file, or a `datasets` name (needs the hub)")
    p.add_argument("--dataset_split", default="test")
    p.add_argument("--dataset_config", default=None, help="hub datasets only (cnn_dailymail: 3.0.0)")
    p.add_argument("--article_key", default="article")
    p.add_argument("--summary_key", default="highlights")
    p.add_argument("--max_articles", type=count, default=20, help="the first N articles (the seeds: 20)")
    p.add_argument("--batch_size", type=count, default=None, help="default: the engine's max_batch_size")
    p.add_argument("--max_input_len", type=count, default=None, help="prompt tokens; default: all that fit")
    p.add_argument("--output_len", type=count, default=100, help="new tokens at most (>= 1)")
    p.add_argument("--test_engine", action="store_true")
    p.add_argument("--test_hf", action="store_true")
    p.add_argument("--check_accuracy", action="store_true", help="fail when a ROUGE-1 is below the threshold")
    p.add_argument("--rouge1_threshold", type=params.flag("threshold"), default=15.0, help="percent (>= 0)")
    p.add_argument("--prompt_style", default="auto", choices=["auto", "tldr", "chat"])
    p.add_argument("--device", default="auto", type=params.device_flag,
                   help="auto | cpu | cuda | cuda:N (both systems)")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer folder for engines built without one")
    p.add_argument("--verify", default="full", choices=["full", "size", "none"])
    p.add_argument("--json_out", default=None, help="write scores, settings and every summary here")
    p.add_argument("--log_level", default=None, type=str.upper, choices=params.LOG_LEVELS)
    args = p.parse_args(argv)
    if not (args.test_engine or args.test_hf):
        args.test_engine = True
    return args


# ---- data ------------------------------------------------------------------------------------------
def load_articles(name: str, split: str, config: str | None, keys: tuple[str, str], n: int) -> list[dict]:
    """[{article, summary}] of the first n records of a JSONL file or a hub dataset."""
    path = Path(name).expanduser()
    if path.is_file():
        rows = _read_jsonl(path, keys, n)
    elif name.endswith((".json", ".jsonl")) or name.startswith(("/", ".", "~")) or path.is_dir():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"dataset file {path} {what}; pass --dataset with a JSONL file holding one "
                        f'{{"{keys[0]}": ..., "{keys[1]}": ...}} object a line')
    else:
        rows = _load_hub(name, split, config or HUB_CONFIGS.get(name), keys, n)
    if not rows:
        raise UserError(f"dataset {name} has no records; pass a JSONL file with at least one article")
    return [{"article": r[keys[0]], "summary": r[keys[1]]} for r in rows]


def _read_jsonl(path: Path, keys: tuple[str, str], n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if len(rows) == n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{num}: not a JSON object ({e}); one object a line") from None
            missing = [k for k in keys if k not in row]
            if missing:
                raise UserError(f"{path}:{num}: no field {missing[0]!r} (has {sorted(row)}); set "
                                "--article_key / --summary_key")
            rows.append(row)
    return rows


def _load_hub(name: str, split: str, config: str | None, keys: tuple[str, str], n: int) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"--dataset {name} is no local file, and a hub dataset needs the `datasets` package "
                        "(not installed); pass a local JSONL file instead") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name or split: datasets raises many types
        why = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--dataset {name}: could not load it from the hub ({type(e).__name__}: {why}); "
                        "offline? pass a local JSONL file instead") from None
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise UserError(f"dataset {name} has no column {missing[0]!r} (has {ds.column_names}); set "
                        "--article_key / --summary_key")
    return list(ds.select(range(min(n, len(ds)))))


# ---- prompts and outputs -----------------------------------------------------------------------------
def pick_style(tokenizer, style: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat" and not has_template:
        raise UserError("--prompt_style chat, but the tokenizer has no chat_template; use tldr")
    return style if style != "auto" else ("chat" if has_template else "tldr")


def prompt_ids(engine: Engine, article: str, style: str, max_len: int) -> list[int]:
    """The prompt's token ids, the article's tail cut until the whole prompt fits max_len."""
    tok = engine.tokenizer

    def encode(text: str) -> list[int]:
        if style == "tldr":
            return engine.encode(text + TLDR)
        msg = [{"role": "user", "content": CHAT_PROMPT.format(article=text)}]
        chat = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        return list(tok(chat, add_special_tokens=False)["input_ids"])  # the template has its specials

    article = article.strip().replace(" n't", "n't")  # as the seeds: the dataset is tokenized text
    ids = encode(article)
    body = list(tok(article, add_special_tokens=False)["input_ids"])
    keep = len(body)
    while len(ids) > max_len and keep > 0:  # cutting tokens may re-merge at the seam: check again
        keep = max(0, keep - (len(ids) - max_len))
        ids = encode(tok.decode(body[:keep]))
    if len(ids) > max_len:
        raise UserError(f"the {style} prompt takes {len(ids)} tokens without any article, over "
                        f"--max_input_len {max_len}; raise it or use --prompt_style tldr")
    return ids


def summary_text(tokenizer, ids: list[int], stops: set[int], style: str) -> str:
    """New tokens -> the summary: up to the first stop token, stripped; tldr: the first paragraph."""
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
    return text.split("\n\n")[0].strip() if style == "tldr" else text


# ---- the two systems ---------------------------------------------------------------------------------
def _batches(prompts: list, size: int, desc: str):
    from tqdm import tqdm

    with tqdm(total=len(prompts), desc=desc, unit="article", file=sys.stderr) as bar:
        for start in range(0, len(prompts), size):
            yield prompts[start:start + size]
            bar.update(min(size, len(prompts) - start))


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int, batch_size: int) -> list[list[int]]:
    out = []
    for batch in _batches(prompts, batch_size, "engine"):
        out += [g.output_ids for g in engine.generate(batch, max_new_tokens=output_len)]
    return out


def _hf_source(hf_model_dir: str | None, engine: Engine) -> Path:
    """--hf_model_dir, or the local path the engine was built from."""
    source = hf_model_dir or engine.config.get("source", {}).get("path")
    if not source or not Path(source).expanduser().exists():
        raise UserError(f"--test_hf needs --hf_model_dir{f' ({source} does not exist)' if source else ''}: "
                        "the HF folder or .gguf file that the engine was built from")
    return Path(source).expanduser()


def load_hf(path: Path, device: torch.device):
    """transformers' model of a HF folder or a .gguf file: fp32 on CPU, the checkpoint's dtype on GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = path.suffix.lower() == ".gguf"
    cfg_kw = {"gguf_file": path.name} if gguf else {}
    config = AutoConfig.from_pretrained(str(path.parent if gguf else path), **cfg_kw)
    dtype = torch.float32 if device.type == "cpu" else (getattr(config, "dtype", None) or torch.float16)
    if not gguf:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
    else:
        # from_pretrained(gguf_file=) refuses to run without `accelerate`: load the same way by hand.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        weights = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise UserError(f"{path}: transformers' GGUF loader left {sorted(missing)} unset and "
                            f"{sorted(unexpected)} unused; this GGUF is not supported for --test_hf")
        model.tie_weights()
    return model.to(device).eval()


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], output_len: int, batch_size: int, stops: set[int],
           pad_id: int) -> list[list[int]]:
    from transformers import GenerationConfig

    # replace, not merge: a checkpoint's generation_config may sample or penalise repeats
    model.generation_config = GenerationConfig(max_new_tokens=output_len, do_sample=False, num_beams=1,
                                               eos_token_id=sorted(stops), pad_token_id=pad_id)
    out = []
    for batch in _batches(prompts, batch_size, "hf"):
        width = max(map(len, batch))  # left padding: every prompt ends where generation starts
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=model.device)
        out += model.generate(input_ids=ids, attention_mask=mask)[:, width:].tolist()
    return out


# ---- scores --------------------------------------------------------------------------------------------
def _sentence_lines(text: str) -> str:
    """One sentence a line: ROUGE-Lsum's unit (the highlights are ' . '-separated on one line)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure in percent (rouge_score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    total = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(_sentence_lines(ref), _sentence_lines(pred))  # (target, prediction)
        for k in ROUGE_KEYS:
            total[k] += s[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in total.items()}


def _table(scores: dict[str, dict], seconds: dict[str, float]) -> str:
    lines = [f"{'system':8}" + "".join(f"{k:>11}" for k in ROUGE_KEYS) + f"{'seconds':>10}"]
    for name, s in scores.items():
        lines.append(f"{name:8}" + "".join(f"{s[k]:11.2f}" for k in ROUGE_KEYS) + f"{seconds[name]:10.1f}")
    return "\n".join(lines)


def prompt_budget(engine: Engine, output_len: int, requested: int | None = None) -> int:
    """The longest prompt that leaves room for output_len new tokens in this engine (or `requested`)."""
    lim = engine.limits
    room = min(lim["max_input_len"], lim["max_seq_len"] - output_len)
    max_len = requested or room
    if max_len > room or max_len < 1:
        raise UserError(f"--max_input_len {max_len} + --output_len {output_len} do not fit this engine "
                        f"(max_input_len {lim['max_input_len']}, max_seq_len {lim['max_seq_len']})")
    return max_len


def summarize(engine: Engine, data: list[dict], style: str, max_len: int, output_len: int, batch: int,
              test_engine: bool = True, hf_model=None) -> dict:
    """Summaries of `data` by the engine and/or a transformers model on the same prompt ids, and their
    ROUGE against the references. Times are generation only."""
    prompts = [prompt_ids(engine, d["article"], style, max_len) for d in data]
    stops = set(engine.spec.eos_token_ids)
    outputs, seconds = {}, {}
    if test_engine:
        t0 = time.perf_counter()
        outputs["engine"] = run_engine(engine, prompts, output_len, batch)
        seconds["engine"] = time.perf_counter() - t0
    if hf_model is not None:
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else min(stops)
        t0 = time.perf_counter()
        outputs["hf"] = run_hf(hf_model, prompts, output_len, batch, stops, pad)
        seconds["hf"] = time.perf_counter() - t0
    refs = [d["summary"] for d in data]
    texts = {k: [summary_text(engine.tokenizer, ids, stops, style) for ids in v] for k, v in outputs.items()}
    return {"scores": {k: rouge_scores(v, refs) for k, v in texts.items()}, "seconds": seconds,
            "texts": texts, "references": refs}


@user_errors_exit
def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    data = load_articles(args.dataset, args.dataset_split, args.dataset_config,
                         (args.article_key, args.summary_key), args.max_articles)
    engine = Engine.load(args.engine_dir, device=args.device, verify=args.verify, tokenizer_dir=args.tokenizer_dir)
    if engine.tokenizer is None:
        raise UserError(f"engine {args.engine_dir} has no tokenizer/; pass --tokenizer_dir")
    max_len = prompt_budget(engine, args.output_len, args.max_input_len)
    lim = engine.limits
    style = pick_style(engine.tokenizer, args.prompt_style)
    batch = args.batch_size or lim["max_batch_size"]
    hf_source = _hf_source(args.hf_model_dir, engine) if args.test_hf else None  # before any long run

    lead = engine.ranks is None or engine.ranks.rank == 0  # other ranks of a launch only run the engine
    hf_model = load_hf(hf_source, engine.device) if args.test_hf and lead else None
    result = summarize(engine, data, style, max_len, args.output_len, batch,
                       test_engine=args.test_engine, hf_model=hf_model)
    scores, seconds, texts, refs = result["scores"], result["seconds"], result["texts"], result["references"]
    print(f"{len(data)} articles, {style} prompts of <= {max_len} tokens, <= {args.output_len} new tokens\n"
          + _table(scores, seconds), file=sys.stderr)
    if args.json_out and lead:
        Path(args.json_out).write_text(json.dumps({
            "settings": {**vars(args), "prompt_style": style, "max_input_len": max_len, "batch_size": batch},
            "scores": scores, "seconds": seconds,
            "articles": [{"summary": r, **{k: v[i] for k, v in texts.items()}} for i, r in enumerate(refs)],
        }, indent=1))
    print(json.dumps(scores), flush=True)
    low = [f"{k} {s['rouge1']:.2f}" for k, s in scores.items() if s["rouge1"] < args.rouge1_threshold]
    if args.check_accuracy and low:
        raise UserError(f"ROUGE-1 below --rouge1_threshold {args.rouge1_threshold:g}: {', '.join(low)}")


if __name__ == "__main__":
    main()
