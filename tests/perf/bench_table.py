"""`make bench`: issue 10's table in one run, as JSON lines and docs/benchmarks.md.

    python tests/perf/bench_table.py gpu --out OUT [--budget_s 1500] [--logs DIR]  # on a GPU machine (gpu_call.sh)
    python tests/perf/bench_table.py gpu --quick --out OUT             # the same steps, tiny engine, CPU
    python tests/perf/bench_table.py cpu --out OUT [--quick]           # engine vs HF generate, fp32 batch 1
    python tests/perf/bench_table.py render OUT/gpu.jsonl [OUT/cpu.jsonl] --doc docs/benchmarks.md

gpu: builds the LLaMA-2-7B dummy engines (bf16 tight 128+256, bf16 2048+1024, int8_wo tight; batch limit
64) through `python -m engine_factory`, runs `python -m runtime.bench --compile` on them, a second process
on the tight engine for the start-up row (compiled artifacts cached in a fresh $EF_COMPILE_CACHE, so the
first process is cold and the second warm), then the peers (`bench_peers.py`, run as a subprocess). Every
step has a timeout and the whole run a budget: a step that would not fit is skipped and says so. Each
result is appended to OUT/<mode>.jsonl as it comes and the markdown is rewritten after each step.
This file lives outside runtime/ (which never builds engines); it imports neither package.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
LLAMA = ["recipe=llama7b_fp16_dummy", "validate=none"]
TIGHT = ["limits.max_batch_size=64", "limits.max_input_len=128", "limits.max_output_len=256"]
# The big-limits engines per card (`python -m engine_factory ... plan=true`, batch limit 64): 4,096 positions at
# batch 64 need 137 GB of bf16 K/V, more than either card holds beside the weights, so the "recipe's limits"
# engine is the largest the plan fits at batch 64 (its max_input_len is the long prompt), and the int8-KV
# engine takes twice its positions, which the plan fits with int8 K/V and not with bf16.
CARDS = {"h200": {"big": (2048, 1024), "kv2x": (2048, 4096)},  # 3,072 / 6,144 positions
         "h100": {"big": (1280, 256), "kv2x": (1280, 1792)}}  # 1,536 / 3,072 (bf16 at 1,792 needs 87.6 GB)


def card_limits(total_bytes: float) -> dict:
    """target_gpu and the big / kv2x limits for a card of total_bytes of memory (CARDS)."""
    target = "h200" if total_bytes > 100e9 else "h100"
    lim = lambda n_in, n_out: ["limits.max_batch_size=64", f"limits.max_input_len={n_in}",  # noqa: E731
                               f"limits.max_output_len={n_out}"]
    c = CARDS[target]
    return {"target": target, "long": c["big"][0], "big": lim(*c["big"]), "kv2x": lim(*c["kv2x"])}


QUICK = ["model=stories260k", "precision=fp32", "validate=none", "limits.max_batch_size=4"]
QUICK_TIGHT = ["limits.max_input_len=16", "limits.max_output_len=16"]
QUICK_BIG = ["limits.max_input_len=48", "limits.max_output_len=208"]


class Run:
    """Steps under one deadline; every record goes to <out>/<mode>.jsonl at once."""

    def __init__(self, out: Path, mode: str, budget_s: float, env: dict, logs: Path | None = None):
        self.out, self.mode, self.env = out, mode, env
        self.logs = logs or out  # (the steps' and builds' logs: --logs)
        self.deadline = time.time() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / f"{mode}.jsonl"
        self.log = open(self.logs / f"{mode}.log", "a")

    def record(self, rec: dict) -> dict:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def left(self) -> float:
        return self.deadline - time.time()

    def sh(self, step: str, cmd: list[str], timeout: float, need: float = 0.0) -> tuple[int, str, float]:
        """Run cmd (stdout captured, stderr to the log) within min(timeout, time left); rc 124 on a timeout,
        rc -1 when fewer than `need` seconds are left (not started)."""
        budget = min(timeout, self.left() - 5)
        if budget < max(need, 1):
            self.record({"kind": "skipped", "step": step, "why": f"{self.left():.0f} s left, needs ~{need:.0f} s"})
            return -1, "", 0.0
        print(f"[bench] {step}: {' '.join(cmd)} (limit {budget:.0f} s)", file=sys.stderr, flush=True)
        self.log.write(f"\n### {step}: {' '.join(cmd)}\n")
        self.log.flush()
        t = time.time()
        env = dict(self.env, EF_BENCH_T0=repr(t))
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True,
                               timeout=budget)
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, out = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        wall = time.time() - t
        self.log.write(out)
        self.log.flush()
        if rc:
            self.record({"kind": "failed", "step": step, "rc": rc, "wall_s": round(wall, 1)})
        return rc, out, wall


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def engine_path(rc: int | None, stdout: str | None) -> str | None:
    """The engine folder a `python -m engine_factory` run printed last ("engine: PATH"), None if it failed."""
    m = re.search(r"^engine: (.+)$", stdout or "", re.M)
    return m.group(1) if m and rc == 0 else None


def build(run: Run, name: str, overrides: list[str], timeout: float) -> str | None:
    rc, out, wall = run.sh(f"build {name}", [PY, "-m", "engine_factory", *overrides], timeout, need=20)
    path = engine_path(rc, out)
    if path:
        run.record({"kind": "build", "name": name, "engine": path, "wall_s": round(wall, 1), "overrides": overrides})
    return path


def bench(run: Run, name: str, engine: str | None, args: list[str], timeout: float, need: float,
          extra: dict | None = None) -> list[dict]:
    if engine is None:
        run.record({"kind": "skipped", "step": name, "why": "its engine did not build"})
        return []
    rc, out, wall = run.sh(name, [PY, "-m", "runtime.bench", "--engine_dir", engine, *args], timeout, need)
    rows = [run.record({"kind": "profile" if "profile" in r else "ours", "name": name, "wall_s": round(wall, 1),
                        **(extra or {}), **r}) for r in json_lines(out)]
    return [r for r in rows if r["kind"] == "ours"]


def peers(run: Run, peers_dir: Path, which: str, batches: list[int], timeout: float, need: float) -> None:
    script = peers_dir / "bench_peers.py"
    if not script.is_file():
        run.record({"kind": "skipped", "step": which, "why": f"{script} is absent"})
        return
    cmd = ["python3", str(script), which, *[a for b in batches for a in ("--batch_size", str(b))]]
    rc, out, wall = run.sh(which, cmd, timeout, need)
    for r in json_lines(out):
        run.record({"kind": "peer", "name": which, "wall_s": round(wall, 1), **r})


def environment(device: str) -> dict:
    info = {"kind": "env", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version()}
    q = [PY, "-c", "import torch, json; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__,"
         " 'device': torch.cuda.get_device_name() if c else 'cpu (%d threads)' % torch.get_num_threads(),"
         " 'gpu_memory_bytes': torch.cuda.mem_get_info()[1] if c else None}))"]
    try:
        info.update(json.loads(subprocess.run(q, capture_output=True, text=True, timeout=120).stdout))
    except (ValueError, subprocess.TimeoutExpired):
        info["device"] = device
    return info


# engine cases: (precision overrides, limits) -> the rows benched on them. The quant cases are issue 11's.
CASES = {
    "tight": (["precision=bf16"], "tight"),
    "big": (["precision=bf16"], "big"),
    "int8_tight": (["precision=int8_wo"], "tight"),
    # bf16 activations: torch's int4 tinygemm takes bf16 only (fp16 int4 engines run the Triton kernel)
    "int4_g128_tight": (["precision=int4_wo_g128", "precision.dtype=bf16"], "tight"),
    # the lm_head quantized too (precision.quant_lm_head), as gpt-fast's int8 and int4 do: 262 MB of bf16 a step
    # become 131 (int8) or ~74 (int4 g128)
    "int8_head_tight": (["precision=int8_wo", "precision.quant_lm_head=true"], "tight"),
    "int4_g128_head_tight": (["precision=int4_wo_g128", "precision.dtype=bf16", "precision.quant_lm_head=true"], "tight"),
    "sq_tight": (["precision=sq", "precision.per_token=true", "precision.per_channel=true", "calibration.dataset=random"],
                 "tight"),
    "fp8_tight": (["precision=fp8", "calibration.dataset=random"], "tight"),
    # with an 8-bit K/V cache: at batch 64 decode attention is ~1/3 of a W8A8 / FP8 step (H100, 2026-12-06)
    "sq_kv8_tight": (["precision=sq", "precision.per_token=true", "precision.per_channel=true",
                      "precision.kv_cache=int8", "calibration.dataset=random"], "tight"),
    "fp8_kv8_tight": (["precision=fp8", "precision.kv_cache=fp8", "calibration.dataset=random"], "tight"),
    # bf16 weights with an int8 K/V cache at the tight limits: issue 10's bf16 batch-64 target (11,000 tok/s) sits at
    # the floor of the weights plus bf16 K/V (~10,900 on an H200); half the K/V bytes is the lever that would pass it
    "kv8_tight": (["precision=bf16", "precision.kv_cache=int8", "calibration.dataset=random"], "tight"),
    # int8 K/V at twice the positions the bf16 cache fits at batch 64 next to the weights (card_limits)
    "kv_int8_2x": (["precision=bf16", "precision.kv_cache=int8", "calibration.dataset=random"], "kv2x"),
}
PEERS = {"gptfast-bf16": [1, 64], "gptfast-int8": [1], "hf-eager": [1]}
DEFAULT_CASES = "tight,warm,big,int8_tight"


def gpu(args) -> None:
    out = Path(args.out)
    cache = out / "compile-cache" if args.quick else Path(f"/tmp/ef-bench-compile-{os.getpid()}")
    env = dict(os.environ, EF_COMPILE_CACHE=str(cache), EF_STORE=args.store or str(REPO / ".store"))
    run = Run(out, "gpu", args.budget_s, env, Path(args.logs) if args.logs else None)
    card = run.record(environment("cuda"))
    q = args.quick
    lim = card_limits(card.get("gpu_memory_bytes") or 80e9)  # no answer: the smaller card's limits
    if not q:
        run.record({"kind": "limits", **lim})
    base = QUICK if q else LLAMA + [f"target_gpu={lim['target']}"]
    limits = {"tight": QUICK_TIGHT if q else TIGHT, "big": QUICK_BIG if q else lim["big"],
              "kv2x": ["limits.max_input_len=48", "limits.max_output_len=416"] if q else lim["kv2x"]}
    B64, IN, OUT, LONG = (4, 16, 16, 48) if q else (64, 128, 256, lim["long"])
    dev = ["--device", "cpu"] if q else []
    common = dev + ["--compile", "--input_len", str(IN), "--output_len", str(OUT)]
    doc = lambda: render([run.jsonl], Path(args.doc) if args.doc else None, out / "benchmarks.md")  # noqa: E731
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(wanted) - set(CASES) - {"warm"} - set(PEERS)
    if unknown:
        raise SystemExit(f"--cases {','.join(sorted(unknown))}: unknown; known: {', '.join([*CASES, 'warm', *PEERS])}")
    cases = list(dict.fromkeys(c for c in wanted if c in CASES))  # each once
    # the second process and the peers run right after the tight engine (the peers' ratios are to it, in the same
    # call): asked for without it, it comes first (a peer alone used to run nothing, silently)
    peers_wanted = set(wanted) & set(PEERS)
    if peers_wanted and q:
        print(f"[bench] {', '.join(sorted(peers_wanted))}: the peers run on a GPU only, not with --quick", file=sys.stderr)
    if ("warm" in wanted or (peers_wanted and not q)) and "tight" not in cases:
        cases.insert(0, "tight")

    def overrides(case):
        prec, lim = CASES[case]
        return base + [p for p in prec if not (q and p == "precision=bf16")] + limits[lim]  # quick: fp32

    if args.build_only:  # the engines alone (the store's locks let a later run of the same cases wait for them)
        _Builds(run, env, overrides, cases).wait_all({})
        return
    # the first case builds in the foreground, the others in the background (BUILD_SLOTS at a time, in the order
    # of the cases) while the GPU benches: four 7B quant builds at once on 16 cores took 290-510 s each (H100
    # host, 2026-12-06), and the first cases' engines came too late
    first = build(run, cases[0], overrides(cases[0]), 240) if cases else None  # alone: the GPU waits for it
    builds = _Builds(run, env, overrides, cases[1:])
    engines = {cases[0]: first} if cases else {}

    def engine(case):
        if case not in engines:
            engines[case] = builds.wait(case)
        return engines[case]

    for case in cases:
        rows = ["--batch_size", "1", "--batch_size", str(B64)]
        if case == "big":
            rows += ["--case", f"1x{LONG}+{OUT}"]
        if case == "kv_int8_2x":
            rows = ["--batch_size", str(B64)]
        if case.endswith("tight"):
            rows += ["--profile"]  # where a decode step's GPU time goes (runtime.bench; CUDA only)
        if case == "kv_int8_2x":  # its K/V fill the GPU: no calibration of another build beside it
            builds.wait_all(engines)
        if case == "kv_int8_2x" and not q:  # the same limits with bf16 K/V: the plan, no build
            _, so, _ = run.sh("plan: bf16 K/V at the int8-KV limits",
                               [PY, "-m", "engine_factory", *base, "precision=bf16", *limits["kv2x"], "plan=true"], 120)
            plan = json_lines(so)
            if plan:
                run.record({"kind": "plan", "name": "bf16 K/V at the int8-KV limits", "fits": plan[-1]["fits"],
                            "total_GB": round(max(r["total_bytes"] for r in plan[-1]["ranks"]) / 1e9, 2),
                            "gpu_GB": round(plan[-1]["gpu_memory_bytes"] / 1e9, 1)})
        bench(run, case + (" (first process: cold compile cache)" if case == "tight" else ""), engine(case),
              common + rows, 240, 60, {"engine_case": case, **({"startup": "cold"} if case == "tight" else {})})
        builds.pump()  # a slot freed while the GPU benched starts the next build
        doc()
        if case == "tight" and "warm" in wanted:
            bench(run, "tight (second process: cached)", engines["tight"], common + ["--batch_size", "1"], 120, 20,
                  {"engine_case": "tight", "startup": "warm"})
            doc()
        if case == "tight" and not q:  # the peers right after our baseline, in the same call
            for name in [w for w in wanted if w in PEERS]:
                peers(run, Path(args.peers), name, PEERS[name], 300, 60)  # gpt-fast compiles per batch
                doc()
    builds.kill()


BUILD_SLOTS = 2


class _Builds:
    """Engine builds in the background, at most BUILD_SLOTS at once, started in the order given; wait(case)
    starts a case at once if it is still queued."""

    def __init__(self, run: Run, env: dict, overrides, cases: list[str]):
        self.run, self.env, self.overrides = run, env, overrides
        self.pending, self.running, self.done = list(cases), {}, {}  # running: case -> (t0, Popen); done: -> path
        self.pump()

    def pump(self) -> None:
        """Collect finished builds, then fill the free slots."""
        for case in [c for c, (_, p) in self.running.items() if p.poll() is not None]:
            self.done[case] = self._collect(case)
        while self.pending and len(self.running) < BUILD_SLOTS:
            self._start(self.pending.pop(0))

    def _start(self, case: str) -> None:
        log = open(self.run.logs / f"build-{case}.log", "w")
        self.running[case] = (time.time(), subprocess.Popen([PY, "-m", "engine_factory", *self.overrides(case)],
                                                            cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                                            stderr=log, text=True))

    def wait(self, case: str) -> str | None:
        if case in self.done:
            return self.done.pop(case)
        if case in self.pending:
            self.pending.remove(case)
            self._start(case)
        path = self._collect(case)
        self.pump()
        return path

    def _collect(self, case: str) -> str | None:
        t0, p = self.running.pop(case)
        try:
            so, _ = p.communicate(timeout=max(1, min(400, self.run.left() - 30)))
        except subprocess.TimeoutExpired:
            p.kill()
            so = ""
        path = engine_path(p.returncode, so)
        self.run.record({"kind": "build" if path else "failed", "name": case, "engine": path,
                         "overrides": self.overrides(case), "wall_s": round(time.time() - t0, 1), "rc": p.returncode})
        return path

    def wait_all(self, engines: dict) -> None:
        for case in [*self.done, *self.running, *self.pending]:
            engines[case] = self.wait(case)

    def kill(self) -> None:
        for _, p in self.running.values():
            p.kill()


# ---- CPU: our engine vs transformers generate, same process, same prompt ----------------------------------
def _hf_model(source: str, torch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if source.endswith(".gguf"):  # transformers' own GGUF reader, dequantized (from_pretrained needs accelerate)
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):
            names = AutoModelForCausalLM.from_config(LlamaConfig(**_gguf_config(source)))
        ck = load_gguf_checkpoint(source, return_tensors=True, model_to_load=names)
        m = AutoModelForCausalLM.from_config(LlamaConfig(**ck["config"]), torch_dtype=torch.float32)
        missing, unexpected = m.load_state_dict({k: v.float() for k, v in ck["tensors"].items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        m.tie_weights()
        return m.eval()
    return AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()


def _gguf_config(path: str) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(path, return_tensors=False)["config"]


def cpu_compare(run: Run, name: str, engines: dict, hf_source: str, n_in: int, n_new: int, reps: int) -> None:
    """One process: HF generate and each engine on the same prompt, greedy, batch 1, tokens/s of the whole
    generation (prefill included). HF and the eager engines take turns, one generation each per round, and
    each keeps its best round (a 2-core machine whose speed drifts by ~20% within minutes drifts for all
    alike); then the tight engine is compiled and takes turns with HF again. (With the compiled engine in the
    same turns the eager one came out at 1.73× HF instead of ~2.3×, perhaps Inductor's OpenMP threads spinning
    after its kernels; not investigated.) HF's best is over all rounds."""
    import torch

    sys.path.insert(0, str(REPO))
    from runtime.engine import Engine

    hf = _hf_model(hf_source, torch)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf.config.vocab_size, (n_in,), generator=g).tolist()
    x = torch.tensor([ids])
    best, extra = {}, {}
    HF = "transformers generate"

    def take_turns(runs: dict) -> None:
        for f in runs.values():
            f()  # warm-up
        for _ in range(reps):
            for impl, f in runs.items():
                t = time.perf_counter()
                f()
                best[impl] = min(best.get(impl, float("inf")), time.perf_counter() - t)

    def engine_run(eng):
        return lambda: eng.generate([ids], max_new_tokens=n_new, ignore_eos=True)

    with torch.inference_mode():
        hf_run = lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,  # noqa: E731
                                     min_new_tokens=n_new, do_sample=False)
        loaded = {case: Engine.load(path, device="cpu", verify="size") for case, path in engines.items()}
        for case, eng in loaded.items():
            extra[f"engine-factory ({case})"] = {"engine": Path(engines[case]).name,
                                                 "max_seq_len": eng.limits["max_seq_len"],
                                                 "decode_attention": eng.model.decode_attention.name}
        take_turns({HF: hf_run, **{f"engine-factory ({c})": engine_run(e) for c, e in loaded.items()}})
        if "tight" in loaded:  # the same engine with its decode step through torch.compile (Inductor's C++)
            eng = loaded["tight"]
            t_c = time.perf_counter()
            eng.compile()
            eng.generate([ids], max_new_tokens=2, ignore_eos=True)
            extra["engine-factory (tight, --compile)"] = {**extra["engine-factory (tight)"],
                                                          "compile_s": round(time.perf_counter() - t_c, 1)}
            take_turns({"engine-factory (tight, --compile)": engine_run(eng), HF: hf_run})
    base = {"kind": "cpu", "model": name, "input_len": n_in, "output_len": n_new, "threads": torch.get_num_threads(),
            "rounds": reps}
    t_hf = best.pop(HF)
    run.record({**base, "impl": HF, "total_tok_s": round(n_new / t_hf, 1)})
    for impl, t in best.items():
        run.record({**base, "impl": impl, **extra[impl], "total_tok_s": round(n_new / t, 1), "vs_hf": round(t_hf / t, 2)})


def cpu(args) -> None:
    out = Path(args.out)
    env = dict(os.environ, EF_STORE=args.store or str(REPO / ".store"))
    run = Run(out, "cpu", args.budget_s, env, Path(args.logs) if args.logs else None)
    run.record(environment("cpu"))
    shared = Path(os.environ.get("EF_SHARED_DIR") or REPO.parent / "shared")
    n_in, n_new, reps = (32, 32, 1) if args.quick else (32, 128, 6)
    stories = {"tight": ["recipe=stories260k_fp32", "validate=none"]}
    smol = {"tight": ["model=smollm2_135m_shared", "precision=fp32", "validate=none", "limits.max_batch_size=1",
                      "limits.max_input_len=64", "limits.max_output_len=128"],
            "4096 limits": ["model=smollm2_135m_shared", "precision=fp32", "validate=none",
                            "limits.max_batch_size=1", "limits.max_input_len=2048", "limits.max_output_len=2048"]}
    models = [("stories260K", stories, str(shared / "models" / "stories260K"))]
    if not args.quick:
        models.append(("SmolLM2-135M", smol, str(shared / "models" / "smollm2-135m-instruct" /
                                                  "SmolLM2-135M-Instruct.Q4_1.gguf")))
    os.environ.update(env)
    for name, recipes, hf_source in models:
        engines = {case: build(run, f"{name} {case}", ov, 300) for case, ov in recipes.items()}
        cpu_compare(run, name, {k: v for k, v in engines.items() if v}, hf_source, n_in, n_new, reps)
        render([run.jsonl], Path(args.doc) if args.doc else None, out / "benchmarks.md")


# ---- the markdown ----------------------------------------------------------------------------------------
def _load(paths) -> list[dict]:
    rows = []
    for p in paths:
        if Path(p).is_file():
            rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return rows


def _ours(rows, case, batch, input_len=None):
    for r in rows:
        if r.get("kind") == "ours" and r.get("engine_case") == case and r.get("batch") == batch \
                and (input_len is None or r.get("input_len") == input_len):
            return r
    return None


def _peer(rows, name, batch):
    return next((r for r in rows if r.get("kind") == "peer" and r.get("name") == name and r.get("batch") == batch),
                None)


def _v(r, key):
    return None if r is None else r.get(key)


def _fmt(x, nd=1):
    return "—" if x is None else f"{x:,.{nd}f}"


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met / missed / not measured) of issue 10."""
    t1, t64 = _ours(rows, "tight", 1, None), None
    t64 = next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == "tight" and r["batch"] > 1), None)
    b1, b64 = _ours(rows, "big", 1), next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == "big"
                                           and r["batch"] > 1), None)
    short = b1 and _ours(rows, "big", 1, b1["input_len"])
    long = next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == "big" and r["batch"] == 1
                 and short and r["input_len"] > short["input_len"]), None)
    i1 = _ours(rows, "int8_tight", 1)
    i64 = next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == "int8_tight" and r["batch"] > 1),
               None)
    g1, g64 = _peer(rows, "gptfast-bf16", 1), _peer(rows, "gptfast-bf16", 64)
    warm = next((r for r in rows if r.get("startup") == "warm" and "ready_s" in r), None)
    tok = lambda r: _v(r, "total_tok_s")  # noqa: E731
    out = []

    def row(name, measured, ok):
        out.append((name, measured, "not measured" if ok is None else ("met" if ok else "missed")))

    r = _ratio(tok(t1), tok(g1))
    row("bf16 batch 1 ≥ 280 total tok/s and ≥ 1.2× gpt-fast", f"{_fmt(tok(t1))} tok/s, {_fmt(r, 2)}× gpt-fast",
        None if tok(t1) is None or r is None else tok(t1) >= 280 and r >= 1.2)
    r = _ratio(tok(t64), tok(g64))
    row("bf16 batch 64 ≥ 11,000 total tok/s and ≥ 1.5× gpt-fast", f"{_fmt(tok(t64))} tok/s, {_fmt(r, 2)}× gpt-fast",
        None if tok(t64) is None or r is None else tok(t64) >= 11000 and r >= 1.5)
    ra, rb = _ratio(tok(b1), tok(t1)), _ratio(tok(b64), tok(t64))
    row(f"limits {_v(b1, 'max_seq_len')} vs {_v(t1, 'max_seq_len')}: within 5% at batch 1, 10% at batch 64",
        f"{_fmt(ra, 3)}× / {_fmt(rb, 3)}×", None if ra is None or rb is None else ra >= 0.95 and rb >= 0.90)
    r = _ratio(_v(long, "decode_tok_s"), _v(short, "decode_tok_s"))
    row(f"long prompt ({_v(long, 'input_len')} in) decode ≥ 0.9× the {_v(short, 'input_len')}-token case",
        f"{_fmt(_v(long, 'decode_tok_s'))} vs {_fmt(_v(short, 'decode_tok_s'))} tok/s = {_fmt(r, 3)}×",
        None if r is None else r >= 0.9)
    row("time to first token ≤ 10 ms at batch 1", f"{_fmt(_v(t1, 'ttft_ms'))} ms",
        None if t1 is None else t1["ttft_ms"] <= 10)
    row("time to first token ≤ 180 ms at batch 64", f"{_fmt(_v(t64, 'ttft_ms'))} ms",
        None if t64 is None else t64["ttft_ms"] <= 180)
    ra, rb = _ratio(tok(i1), tok(t1)), _ratio(tok(i64), tok(t64))
    row("int8_wo batch 1 ≥ 1.7× bf16 batch 1; batch 64 ≥ bf16 batch 64", f"{_fmt(ra, 2)}× / {_fmt(rb, 2)}×",
        None if ra is None or rb is None else ra >= 1.7 and rb >= 1.0)
    h1 = _ours(rows, "int8_head_tight", 1)
    if h1 is not None:  # the same with the lm_head quantized too (precision.quant_lm_head, as gpt-fast's int8)
        r = _ratio(tok(h1), tok(t1))
        row("int8_wo with precision.quant_lm_head=true, batch 1 ≥ 1.7× bf16 batch 1", f"{_fmt(r, 2)}×",
            None if r is None else r >= 1.7)
    row("start-up: a second process with --compile reaches its first token in ≤ 20 s (engine loaded / first token / "
        "compiled decode running)",
        f"{_fmt(_v(warm, 'load_s'))} s / {_fmt(_v(warm, 'first_token_s'))} s / {_fmt(_v(warm, 'ready_s'))} s",
        None if warm is None else warm["first_token_s"] <= 20)
    return out


def quant_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) of issue 11's H200 row: each quant case against bf16 tight in the same run."""
    def pick(case, big):
        return next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == case
                     and (r["batch"] > 1) == big and r.get("input_len") == 128 and r.get("startup") != "warm"), None)

    tok = lambda r: _v(r, "total_tok_s")  # noqa: E731
    t1, t64 = pick("tight", False), pick("tight", True)
    out = []
    for case, label, big, want in (("int4_g128_tight", "int4_wo_g128 batch 1", False, 2.5),
                                   ("int4_g128_head_tight", "int4_wo_g128 + quant_lm_head batch 1", False, 2.5),
                                   ("sq_tight", "SmoothQuant batch 64", True, 1.3),
                                   ("fp8_tight", "fp8 batch 64", True, 1.3),
                                   ("sq_kv8_tight", "SmoothQuant + int8 KV batch 64", True, 1.3),
                                   ("fp8_kv8_tight", "fp8 + fp8 KV batch 64", True, 1.3)):
        r = _ratio(tok(pick(case, big)), tok(t64 if big else t1))
        out.append((f"{label} ≥ {want}× bf16", f"{_fmt(tok(pick(case, big)))} tok/s = {_fmt(r, 2)}×",
                    "not measured" if r is None else ("met" if r >= want else "missed")))
    kv = pick("kv_int8_2x", True)
    big64 = next((r for r in rows if r.get("kind") == "ours" and r.get("engine_case") == "big" and r["batch"] > 1), None)
    plan = next((r for r in rows if r.get("kind") == "plan"), None)  # bf16 K/V at the int8 engine's limits
    ok = None if kv is None or (big64 is None and plan is None) else \
        (big64 is None or kv["max_seq_len"] >= 2 * big64["max_seq_len"]) and (plan is None or not plan["fits"])
    bf16 = "" if plan is None else f" (bf16 K/V there: {plan['total_GB']} GB, {'fits' if plan['fits'] else 'does not fit'} " \
        f"{plan['gpu_GB']} GB)"
    out.append(("int8 KV: batch 64 at twice the max_seq_len bf16 K/V fits",
                f"{_v(kv, 'max_seq_len')} vs {_v(big64, 'max_seq_len')} positions{bf16}, {_fmt(tok(kv))} tok/s, "
                f"peak {_fmt(_v(kv, 'peak_mem_GB'))} GB", "not measured" if ok is None else ("met" if ok else "missed")))
    return out


def cpu_targets(rows):
    out = []
    for model, want in (("stories260K", 2.0), ("SmolLM2-135M", 1.2)):
        r = next((x for x in rows if x.get("kind") == "cpu" and x.get("model") == model
                  and x.get("impl") == "engine-factory (tight)"), None)
        c = next((x for x in rows if x.get("kind") == "cpu" and x.get("model") == model
                  and x.get("impl") == "engine-factory (tight, --compile)"), None)
        out.append((f"{model} ≥ {want}× HF generate (eager; --compile)",
                    f"{_fmt(_v(r, 'vs_hf'), 2)}×; {_fmt(_v(c, 'vs_hf'), 2)}×",
                    "not measured" if r is None else ("met" if r["vs_hf"] >= want else "missed") +
                    ("" if c is None else "; " + ("met" if c["vs_hf"] >= want else "missed"))))
    tight = next((x for x in rows if x.get("impl") == "engine-factory (tight)" and x.get("model") == "SmolLM2-135M"),
                 None)
    big = next((x for x in rows if x.get("impl") == "engine-factory (4096 limits)"), None)
    r = _ratio(_v(big, "total_tok_s"), _v(tight, "total_tok_s"))
    out.append(("4,096-token limits ≥ 0.9× the tight build", f"{_fmt(r, 3)}×",
                "not measured" if r is None else ("met" if r >= 0.9 else "missed")))
    return out


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def section(rows: list[dict], mode: str, source: str | None = None) -> str:
    env = next((r for r in rows if r.get("kind") == "env"), {})
    lines = [f"<!-- {mode} -->", f"## {'GPU' if mode == 'gpu' else 'CPU'}: {env.get('device', '?')}", "",
             f"{env.get('date', '?')}, torch {env.get('torch', '?')}, python {env.get('python', '?')}, "
             f"`python tests/perf/bench_table.py {mode}`. Raw JSON lines: `{source or mode + '.jsonl'}`.", ""]
    if mode == "gpu":
        lines += ["### Targets (issue 10)", ""] + _table(["target", "measured", ""], targets(rows)) + [""]
        lines += ["### Targets (issue 11, quantization)", ""] + _table(["target", "measured", ""], quant_targets(rows))
        lines += [""]
        keys = ["batch", "input_len", "output_len", "max_seq_len", "ttft_ms", "decode_tok_s", "total_tok_s",
                "achieved_weight_GB_s", "peak_mem_GB"]
        runs = [r for r in rows if r.get("kind") in ("ours", "peer")]
        lines += ["### Every run", ""] + _table(["run"] + keys + ["first_token_s", "ready_s"],
                                                [[r["name"]] + [_v(r, k) if _v(r, k) is not None else "—"
                                                                for k in keys + ["first_token_s", "ready_s"]]
                                                 for r in runs]) + [""]
        g = {b: _peer(rows, "gptfast-bf16", b) for b in (1, 64)}
        ratio_rows = [[r["name"], r["batch"], _fmt(_ratio(r["total_tok_s"], _v(g.get(r["batch"]), "total_tok_s")), 2)]
                      for r in runs if r.get("kind") == "ours" and r["batch"] in g and r["input_len"] == 128]
        if ratio_rows:
            lines += ["Ratio of total tok/s to gpt-fast bf16 at the same batch:", ""]
            lines += _table(["run", "batch", "× gpt-fast"], ratio_rows) + [""]
    else:
        lines += ["### Targets (issue 10, CPU row)", ""] + _table(["target", "measured", ""], cpu_targets(rows))
        lines += ["", "### Every run (fp32, batch 1, greedy, total tok/s incl. prefill; HF and the engines take turns, "
                  "each its best round)", ""]
        lines += _table(["model", "impl", "input_len", "output_len", "max_seq_len", "decode attention", "tok/s",
                         "× HF"], [[r["model"], r["impl"], r["input_len"], r["output_len"], _v(r, "max_seq_len") or "—",
                                    _v(r, "decode_attention") or "—", r["total_tok_s"], _v(r, "vs_hf") or "—"]
                                   for r in rows if r.get("kind") == "cpu"]) + [""]
    for prof in (r for r in rows if r.get("kind") == "profile"):
        lines += [f"Decode step of {prof['name']} at batch {prof['batch']} ({prof['input_len']}-token prompts): "
                  f"{_fmt(prof['gpu_us_per_step'])} µs of GPU kernels a step (torch.profiler, {prof['steps']} steps "
                  "less the prefill); the top kernels:", ""]
        lines += _table(["kernel", "µs / step", "share"], [[f"`{k['kernel'].replace('|', '/')}`", _fmt(k["us_per_step"]),
                                                           f"{100 * k['share']:.1f}%"] for k in prof["top"]]) + [""]
    builds = [r for r in rows if r.get("kind") == "build"]
    if builds:
        lines += ["Builds: " + "; ".join(f"{r['name']} {r['wall_s']} s (`{' '.join(r['overrides'])}`)"
                                         for r in builds) + ".", ""]
    bad = [r for r in rows if r.get("kind") in ("failed", "skipped")]
    if bad:
        lines += ["Not run / failed: " + "; ".join(f"{r.get('step', r.get('name'))}: "
                                                 f"{r.get('why') or 'rc %s' % r.get('rc')}" for r in bad) + ".", ""]
    lines.append(f"<!-- /{mode} -->")
    return "\n".join(lines) + "\n"


HEAD = """# Benchmarks

Written by `make bench` (`tests/perf/bench_table.py`); each section is replaced by its own run. Engines:
LLaMA-2-7B architecture with dummy weights; peers from `../shared/peers/bench_peers.py` in the same run.

"""


def render(jsonls, doc: Path | None, also: Path | None = None) -> str:
    """Rebuild each mode's section of `doc` (and write the whole doc to `also`) from the JSON lines."""
    text = doc.read_text() if doc and doc.is_file() else HEAD
    for path in jsonls:
        rows = _load([path])  # any file name (docs/runs/h200-<date>.jsonl): its rows say which section, else its name
        kinds = {r.get("kind") for r in rows}
        mode = "cpu" if "cpu" in kinds else "gpu" if kinds & {"ours", "peer"} else \
            "cpu" if Path(path).stem == "cpu" else "gpu"
        new = section(rows, mode, os.path.relpath(path, doc.parent) if doc else Path(path).name)
        pat = re.compile(rf"<!-- {mode} -->.*?<!-- /{mode} -->\n?", re.S)
        text = pat.sub(lambda m: new, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + new
    for p in (doc, also):
        if p:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("gpu", "cpu"):
        s = sub.add_parser(mode)
        s.add_argument("--out", default=str(REPO / "bench-out"))
        s.add_argument("--logs", default=None, help="the steps' and builds' logs (default: --out; gpu_call.sh keeps "
                                                    "them apart, as the device tool brings back 8 files at most)")
        s.add_argument("--doc", default=None, help="also rewrite this markdown's section (e.g. docs/benchmarks.md)")
        s.add_argument("--store", default=None, help="engine store (default: .store of the checkout)")
        s.add_argument("--budget_s", type=float, default=1500 if mode == "gpu" else 1800)  # gpu_call.sh: its own
        s.add_argument("--quick", action="store_true", help="tiny engine (stories260K), CPU: the same code path")
        if mode == "gpu":
            s.add_argument("--build_only", action="store_true",
                           help="build the cases' engines into the store and stop (gpu_call.sh PREBUILD=1 runs it "
                                "beside the cuda tests; the table then finds them built)")
            s.add_argument("--cases", default=DEFAULT_CASES + ",gptfast-bf16,gptfast-int8,hf-eager",
                           help="comma-separated engine cases and peers to run: " + ", ".join([*CASES, "warm", *PEERS]))
        s.add_argument("--peers", default=str(REPO / ".peers") if (REPO / ".peers").is_dir()
                       else str(REPO.parent / "shared" / "peers"))
    r = sub.add_parser("render")
    r.add_argument("jsonl", nargs="+")
    r.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    if args.mode == "render":
        render(args.jsonl, Path(args.doc))
    else:
        {"gpu": gpu, "cpu": cpu}[args.mode](args)
        print((Path(args.out) / "benchmarks.md").read_text() if (Path(args.out) / "benchmarks.md").is_file() else "")


if __name__ == "__main__":
    main()
