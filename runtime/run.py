"""python -m runtime.run: generate with an engine (the seeds' run.py).

Prints, for each prompt, the prompt followed by its continuation (as llama2.c does), or one JSON
object per prompt with --json.
"""
from __future__ import annotations

import json
import sys

from . import params
from .cli import setup_logging, user_errors_exit
from .engine import Engine
from .errors import UserError


def parse_args(argv=None):
    p = params.ArgumentParser(prog="python -m runtime.run", description=__doc__)
    p.add_argument("--engine_dir", required=True, help="engine directory (the path that the build printed)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--input_text", action="append", default=None, type=params.text_flag,
                        help="prompt text; repeat for a batch "
                             "(default: 'Born in north-east France, Soyer trained as a')")
    prompt.add_argument("--input_ids", action="append", default=None, type=params.ids_flag,
                        help="comma-separated token ids instead of text; repeat for a batch")
    p.add_argument("--max_output_len", type=params.flag("max_new_tokens"), default=32,
                   help="new tokens per prompt (>= 1)")
    p.add_argument("--temperature", type=params.flag("temperature"), default=0.0, help=">= 0; 0 = greedy")
    p.add_argument("--top_k", type=params.flag("top_k"), default=0, help=">= 0; 0 = off")
    p.add_argument("--top_p", type=params.flag("top_p"), default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=params.flag("seed"), default=0, help=">= 0")
    p.add_argument("--stop", action="append", default=None, type=params.stop_flag,
                   help="stop string (not empty); repeatable")
    p.add_argument("--ignore_eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--device", default="auto", type=params.device_flag, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer folder for engines built without one")
    p.add_argument("--verify", default="full", choices=["full", "size", "none"],
                   help="manifest check at load: sha256 of every file (cached), sizes only, or none")
    p.add_argument("--streaming", action="store_true", help="print tokens as they come (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, faster steps)")
    p.add_argument("--log_level", default=None, type=str.upper, choices=params.LOG_LEVELS)
    return p.parse_args(argv)


@user_errors_exit
def main(argv=None) -> None:
    args = parse_args(argv)  # every flag checked here, before the (long) load
    setup_logging(args.log_level)
    engine = Engine.load(args.engine_dir, device=args.device, verify=args.verify,
                         tokenizer_dir=args.tokenizer_dir)
    if args.compile:
        engine.compile()
    prompts = args.input_ids or args.input_text or ["Born in north-east France, Soyer trained as a"]
    flag = "--input_ids" if args.input_ids else "--input_text"
    try:  # what only the engine can tell (vocabulary, limits, tokenizer), with the flag named
        seqs = engine._as_ids(prompts)
        engine._check_lengths(seqs, args.max_output_len)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    if args.stop and engine.tokenizer is None:
        raise UserError(f"--stop needs a tokenizer and engine {args.engine_dir} has none; pass --tokenizer_dir, "
                        "or stop at EOS")
    streamer = None
    if args.streaming and not args.json and engine.tokenizer is not None and len(prompts) == 1:
        ids = list(seqs[0])
        shown = engine.decode_text(ids)
        sys.stdout.write(shown)

        def streamer(i, tok):  # decode the whole text and print what is new: pieces merge across tokens
            nonlocal shown
            ids.append(tok)
            text = engine.decode_text(ids)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    gens = engine.generate(seqs, max_new_tokens=args.max_output_len, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, stop=args.stop, ignore_eos=args.ignore_eos,
                           seed=args.seed, streamer=streamer)
    for prompt, g in zip(prompts, gens):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_ids": g.prompt_ids, "output_ids": g.output_ids,
                              "output_text": g.text, "finish_reason": g.finish_reason}))
        elif engine.tokenizer is None:
            print(" ".join(map(str, g.prompt_ids + g.output_ids)))
        elif streamer is not None:
            print()
        else:
            print(engine.decode_text(g.prompt_ids + g.output_ids))


if __name__ == "__main__":
    main()
