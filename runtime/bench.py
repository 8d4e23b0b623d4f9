"""python -m runtime.bench: speed of an engine, as JSON lines (one per batch size).

time to first token (prefill), decode tokens/s, achieved weight bandwidth (GB/s: weight bytes read
per decode step over its time), peak GPU memory. Benchmarks live here, never in timed tests.

Rows: every --batch_size at --input_len/--output_len, then every --case BxIN+OUT (e.g. 1x2048+256).
The first row also says how long this process took to load the engine (load_s), to its first token
(first_token_s) and to the end of its warm-up, compiled decode included (ready_s): from $EF_BENCH_T0 (a
time.time() the caller sets just before starting this process), else from the start of main(). With --compile the compiled artifacts are
cached between processes (runtime.engine.compile_cache_dir), so a second process starts faster.
"""
from __future__ import annotations

import ast
import json
import os
import re
import time

import torch

from . import params
from .cli import setup_logging, user_errors_exit
from .engine import Engine
from .errors import UserError
from .format import rank_file


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(engine: Engine, batch: int, input_len: int, output_len: int, reps: int = 3,
          since: float | None = None) -> dict:
    """One row. since: a time.time() to report first_token_s / ready_s from (the process's start)."""
    dev = engine.device
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, engine.spec.vocab_size, (input_len,), generator=g).tolist() for _ in range(batch)]
    first = []
    engine.generate(prompts, max_new_tokens=4, ignore_eos=True,  # warm-up: cache, compilation, graphs
                    streamer=(lambda i, t: first or first.append(time.time())) if since is not None else None)
    ready = time.time()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ttft, total = [], []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        engine.generate(prompts, max_new_tokens=1, ignore_eos=True)
        _sync(dev)
        t1 = time.perf_counter()
        engine.generate(prompts, max_new_tokens=output_len, ignore_eos=True)
        _sync(dev)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        total.append(t2 - t1)
    ttft_s, total_s = min(ttft), min(total)
    decode_s = max(total_s - ttft_s, 1e-9) / max(output_len - 1, 1)
    weight_bytes = (engine.engine_dir / rank_file(0)).stat().st_size  # read once per decode step
    startup = {} if since is None else {"first_token_s": round(first[0] - since, 2),
                                        "ready_s": round(ready - since, 2)}
    return {
        "engine": engine.engine_dir.name, "device": str(dev), "dtype": engine.config["dtype"], "batch": batch,
        "input_len": input_len, "output_len": output_len, "ttft_ms": round(ttft_s * 1e3, 3),
        "decode_ms_per_step": round(decode_s * 1e3, 4), "decode_tok_s": round(batch / decode_s, 1),
        "total_tok_s": round(batch * output_len / total_s, 1),
        "achieved_weight_GB_s": round(weight_bytes / decode_s / 1e9, 1),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated(dev) / 1e9, 3) if dev.type == "cuda" else None,
        "cuda_graphs": engine.use_cuda_graphs, "compiled": engine.compiled,
        "decode_attention": engine.model.decode_attention.name, "torch": torch.__version__,
        "max_seq_len": engine.limits["max_seq_len"], **startup,
    }


def profile(engine: Engine, batch: int, input_len: int, steps: int = 32, top: int = 15) -> dict:
    """Where a decode step's GPU time goes: torch.profiler over a prefill alone and over the same prefill
    plus `steps` decode steps; each kernel's time in the second minus the first, per step (kernels
    replayed from CUDA graphs included). Returns a JSON-able row: the top kernels and their shares."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, engine.spec.vocab_size, (input_len,), generator=g).tolist() for _ in range(batch)]
    engine.generate(prompts, max_new_tokens=steps + 1, ignore_eos=True)  # warm: graphs and compilation

    def kernels(new_tokens: int) -> dict[str, float]:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
            _sync(engine.device)
        times: dict[str, float] = {}
        for e in prof.events():  # the kernels themselves (a CPU op's device time would count them twice)
            if e.device_type == DeviceType.CUDA:
                times[e.name] = times.get(e.name, 0.0) + e.device_time_total
        return times

    base, full = kernels(1), kernels(steps + 1)
    per_step = {k: (v - base.get(k, 0.0)) / steps for k, v in full.items()}
    per_step = {k: v for k, v in per_step.items() if v > 0}
    total = sum(per_step.values())
    rows = sorted(per_step.items(), key=lambda kv: -kv[1])[:top]
    return {"profile": engine.engine_dir.name, "batch": batch, "input_len": input_len, "steps": steps,
            "gpu_us_per_step": round(total, 1),
            "top": [{"kernel": k[:120], "us_per_step": round(v, 1), "share": round(v / total, 3)} for k, v in rows]}


def _case(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+)\+(\d+)\s*", text)
    if not m or min(int(x) for x in m.groups()) < 1:
        raise params.argparse.ArgumentTypeError(f"{text}: must be BATCHxINPUT+OUTPUT, e.g. 1x2048+256")
    return tuple(int(x) for x in m.groups())


def _inductor_option(text: str) -> tuple[str, object]:
    import torch._inductor.config as inductor_config

    key, sep, value = text.partition("=")
    if not sep or not hasattr(inductor_config, key.strip()):
        raise params.argparse.ArgumentTypeError(f"{text}: must be KEY=VALUE with KEY an Inductor config "
                                                "(torch._inductor.config), e.g. combo_kernels=true")
    v = value.strip()
    if v.lower() in ("true", "false"):
        return key.strip(), v.lower() == "true"
    try:  # 3, 0.5, "text"
        return key.strip(), ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return key.strip(), v


@user_errors_exit
def main(argv=None) -> None:
    count = params.flag("count")
    p = params.ArgumentParser(prog="python -m runtime.bench", description=__doc__)
    p.add_argument("--engine_dir", required=True)
    p.add_argument("--device", default="auto", type=params.device_flag, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch_size", type=count, action="append", help=">= 1; repeatable (default 1)")
    p.add_argument("--input_len", type=count, default=128, help="prompt tokens (>= 1)")
    p.add_argument("--output_len", type=count, default=128, help="new tokens (>= 1)")
    p.add_argument("--case", type=_case, action="append", default=[],
                   help="BATCHxINPUT+OUTPUT, e.g. 1x2048+256: one more row; repeatable")
    p.add_argument("--reps", type=count, default=3, help=">= 1")
    p.add_argument("--no_cuda_graphs", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles at warm-up)")
    p.add_argument("--inductor", type=_inductor_option, action="append", default=[], metavar="KEY=VALUE",
                   help="with --compile: an Inductor config of the decode step, e.g. combo_kernels=true; repeatable")
    p.add_argument("--profile", action="store_true",
                   help="after the rows, one JSON line per --batch_size: the GPU kernels of a decode step (torch.profiler)")
    args = p.parse_args(argv)
    if args.inductor and not args.compile:
        raise UserError("--inductor: takes effect with --compile only; add --compile")
    t0 = float(os.environ.get("EF_BENCH_T0") or time.time())
    setup_logging()
    engine = Engine.load(args.engine_dir, device=args.device, verify="size")
    loaded = time.time()
    lim = engine.limits
    rows = [(b, args.input_len, args.output_len) for b in (args.batch_size or ([] if args.case else [1]))]
    flags = [f"--input_len {args.input_len} --output_len {args.output_len}"] * len(rows)
    rows += args.case
    flags += [f"--case {b}x{n_in}+{n_out}" for b, n_in, n_out in args.case]
    for (b, n_in, n_out), flag in zip(rows, flags):  # a batch above max_batch_size is run in chunks
        if n_in > lim["max_input_len"] or n_in + n_out > lim["max_seq_len"]:
            raise UserError(f"{flag}: this engine takes at most {lim['max_input_len']} input and "
                            f"{lim['max_seq_len']} input + output tokens (rebuild with larger limits)")
    if args.no_cuda_graphs:
        engine.use_cuda_graphs = False
    if args.compile:
        engine.compile(dict(args.inductor))
    for i, (b, n_in, n_out) in enumerate(rows):
        row = bench(engine, b, n_in, n_out, args.reps, t0 if i == 0 else None)
        if engine.inductor_options:  # (the compiled step's defaults, runtime.engine.decode_defaults, and --inductor)
            row["inductor"] = engine.inductor_options
        if i == 0:  # where the start-up went: the engine in memory (weights on the device) by load_s
            row["load_s"] = round(loaded - t0, 2)
        print(json.dumps(row), flush=True)
    if args.profile and engine.device.type == "cuda":
        for b in args.batch_size or [1]:
            print(json.dumps(profile(engine, b, args.input_len)), flush=True)


if __name__ == "__main__":
    main()
