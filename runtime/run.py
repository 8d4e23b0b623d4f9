"""python -m runtime.run: generate with an engine (the seeds' run.py).

Prints, for each prompt, the prompt followed by its continuation (as llama2.c does), or one JSON
object per prompt with --json.
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli import setup_logging, user_errors_exit
from .engine import Engine


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.run", description=__doc__)
    p.add_argument("--engine_dir", required=True, help="engine directory (the path that the build printed)")
    p.add_argument("--input_text", action="append", default=None,
                   help="prompt text; repeat for a batch (default: 'Born in north-east France, Soyer trained as a')")
    p.add_argument("--input_ids", action="append", default=None,
                   help="comma-separated token ids instead of text; repeat for a batch")
    p.add_argument("--max_output_len", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    p.add_argument("--ignore_eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer folder for engines built without one")
    p.add_argument("--verify", default="full", choices=["full", "size", "none"],
                   help="manifest check at load: sha256 of every file (cached), sizes only, or none")
    p.add_argument("--streaming", action="store_true", help="print tokens as they come (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, faster steps)")
    p.add_argument("--log_level", default=None)
    return p.parse_args(argv)


@user_errors_exit
def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    engine = Engine.load(args.engine_dir, device=args.device, verify=args.verify,
                         tokenizer_dir=args.tokenizer_dir)
    if args.compile:
        engine.compile()
    if args.input_ids:
        prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.input_ids]
    else:
        prompts = args.input_text or ["Born in north-east France, Soyer trained as a"]
    streamer = None
    if args.streaming and not args.json and engine.tokenizer is not None and len(prompts) == 1:
        ids = engine.encode(prompts[0]) if isinstance(prompts[0], str) else list(prompts[0])
        shown = engine.decode_text(ids)
        sys.stdout.write(shown)

        def streamer(i, tok):  # decode the whole text and print what is new: pieces merge across tokens
            nonlocal shown
            ids.append(tok)
            text = engine.decode_text(ids)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    gens = engine.generate(prompts, max_new_tokens=args.max_output_len, temperature=args.temperature,
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
