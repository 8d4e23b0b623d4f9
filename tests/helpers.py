"""Plain helpers for the tests (fixtures live in conftest.py): references, CLI runs, store checks."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Keep engine builds small: 64 + 64 positions, batches of 4.
LIMITS = ["limits.max_input_len=64", "limits.max_output_len=64", "limits.max_batch_size=4"]
# Store entries that are not engines: stage caches, locks, Hydra run/sweep logs, failed reports.
NOT_ENGINES = {"runs", "sweeps", "failed"}


# ---- references ------------------------------------------------------------------------------------
def hf_model(folder: Path):
    """transformers' own implementation of a checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """(T, V) logits of one unpadded sequence."""
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' forward with its own KV cache; EOS is an ordinary token here."""
    import inspect

    # transformers >= 5.2x names the cache `cache` (in and out; `past_key_values` warns), older ones past_key_values
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < n:
        out = model(input_ids=torch.tensor([toks[-1:]]), use_cache=True, **{key: out[key]})
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


# ---- random decoders -------------------------------------------------------------------------------
# (position, heads, kv heads, rotary dims): LLaMA-like GQA with rope, GPT-NeoX-like partial rotary (8 of 16
# dims), BLOOM-like ALiBi over 6 heads, BigCode-like MQA
DECODERS = {"rope_gqa": ("rope", 8, 2, 0), "rope_partial_mha": ("rope", 4, 4, 8), "alibi_6_heads": ("alibi", 6, 6, 0),
            "learned_mqa": ("learned", 8, 1, 0)}


def random_decoder(kind: str, dtype, device, cache: tuple[int, int] = (4, 40)):
    """A 2-layer runtime Decoder of DECODERS[kind] with random weights in the runtime layout, head_dim 16,
    vocab 97, its cache allocated (max batch, max seq len); its attention entries chosen as usual."""
    from runtime.model import Decoder

    d = Decoder(*random_decoder_tensors(kind, dtype, device))
    d.allocate_cache(*cache)
    return d


def random_decoder_tensors(kind: str, dtype, device):
    """random_decoder's (spec, tensors by runtime name)."""
    from runtime.spec import ModelSpec

    position, nh, nkv, rotary_dim = DECODERS[kind]
    spec = ModelSpec(family="test", vocab_size=97, hidden_size=16 * nh, num_layers=2, num_heads=nh, num_kv_heads=nkv,
                     intermediate_size=80, max_position_embeddings=64, position=position, rotary_dim=rotary_dim,
                     mlp="gated" if position == "rope" else "plain", norm="rms" if position == "rope" else "layer")
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: (0.2 * torch.randn(*shape, generator=g)).to(device, dtype)
    H, I, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    t = {"embed.weight": r(spec.vocab_size, H), "lm_head.weight": r(spec.vocab_size, H), "final_norm.weight": 1 + r(H)}
    if position == "learned":
        t["pos_embed.weight"] = r(spec.max_position_embeddings, H)
    for i in range(spec.num_layers):
        t.update({f"layers.{i}.attn_norm.weight": 1 + r(H), f"layers.{i}.mlp_norm.weight": 1 + r(H),
                  f"layers.{i}.attn.qkv.weight": r((nh + 2 * nkv) * hd, H), f"layers.{i}.attn.o.weight": r(H, nh * hd),
                  f"layers.{i}.mlp.up.weight": r(2 * I if position == "rope" else I, H),
                  f"layers.{i}.mlp.down.weight": r(H, I)})
    return spec, t


# ---- builds ----------------------------------------------------------------------------------------
def assert_scores_match(engine, prompts: list[list[int]], reference_logits, tol: float = 1e-4) -> None:
    """The engine's logits, for the packed batch and for each prompt alone, within tol of the reference's."""
    for ids, ours_batched in zip(prompts, engine.score(prompts)):
        want = reference_logits(ids)
        ours = engine.score(ids)
        assert ours.shape == want.shape == ours_batched.shape
        assert (ours - want).abs().max().item() <= tol
        assert (ours_batched - want).abs().max().item() <= tol


def build_in_process(source, store: Path, *overrides: str) -> Path:
    """Compose the config as the CLI does and run the pipeline in this process; the engine folder."""
    from engine_factory import config, pipeline

    cfg = config.compose([f"model.source={source}", f"store={store}", *LIMITS, *overrides])
    return pipeline.run(cfg)


class _Zygote:
    """The client of tests/zygote.py: `python -m` commands forked from one pre-imported process (see
    there). None when it cannot run here (no fork, threads at import, $EF_TEST_ZYGOTE=0)."""
    _proc = None
    _env: dict | None = None
    lock = threading.Lock()

    @classmethod
    def get(cls, env: dict):
        if cls._proc is False or os.environ.get("EF_TEST_ZYGOTE") == "0" or not hasattr(os, "fork"):
            return None
        if cls._proc is None or cls._proc.poll() is not None:
            cls._proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")], cwd=str(ROOT),
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1)
            cls._env = dict(env)
            import atexit

            atexit.register(cls._proc.kill)
            if not json.loads(cls._proc.stdout.readline() or "{}").get("ready"):
                cls._proc.kill()
                cls._proc = False
                return None
        return cls._proc

    @classmethod
    def fits(cls, env: dict) -> bool:
        """Only what our code reads at call time may differ from the zygote's environment (EF_* settings,
        the thread count): anything else (HF_HUB_*, TRITON_*, CUDA_*) is read at import."""
        keys = set(env) | set(cls._env or {})
        return all(k.startswith("EF_") or k == "OMP_NUM_THREADS" or env.get(k) == (cls._env or {}).get(k)
                   for k in keys)


def _forked(module, argv, cwd, env, timeout, raw):
    """One command through the zygote, or None. It runs one command at a time: a command started while
    another runs (tests that run builds at once, from threads) takes a real subprocess, so they overlap."""
    if not _Zygote.lock.acquire(blocking=False):
        return None
    try:
        return _forked_locked(module, argv, cwd, env, timeout, raw)
    finally:
        _Zygote.lock.release()


def _forked_locked(module, argv, cwd, env, timeout, raw):
    import tempfile

    zyg = _Zygote.get(env)
    if zyg is None or not _Zygote.fits(env) or any(isinstance(a, bytes) for a in argv):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        zyg.stdin.write(json.dumps({"module": module, "argv": argv, "cwd": cwd, "env": env, "out": str(out),
                                    "err": str(err), "timeout": timeout}) + "\n")
        zyg.stdin.flush()
        line = zyg.stdout.readline()
        if not line:  # the zygote died (killed by a test?): start another for the next command
            _Zygote._proc = None
            return None
        reply = json.loads(line)
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if reply.get("timeout"):
        raise subprocess.TimeoutExpired([module, *argv], timeout, stdout, stderr)
    return reply["rc"], stdout if raw else stdout.decode(), stderr.decode(errors="replace")


def run_module(module: str, *args, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300, raw: bool = False) -> tuple[int, str | bytes, str]:
    """python -m module args... -> (returncode, stdout, stderr); stdout as bytes when raw. Forked from a
    pre-imported process (tests/zygote.py) where the environment allows; a real subprocess otherwise."""
    # tiny models: one thread (see conftest.one_thread) unless the caller's environment says otherwise
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                **(env or {})}
    # bytes pass through as they are (argv that is not UTF-8); anything else as str
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    got = _forked(module, argv, str(cwd or ROOT), full_env, timeout, raw)
    if got is not None:
        return got
    p = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                       cwd=str(cwd or ROOT), env=full_env, timeout=timeout)
    out = p.stdout if raw else p.stdout.decode()
    return p.returncode, out, p.stderr.decode(errors="replace")


def assert_one_clear_line(result, *fragments: str) -> str:
    """(rc, stdout, stderr) of a command that must fail with one clear line: rc != 0, no traceback, exactly
    one stderr line starting with "error:", last, containing every fragment; that line."""
    rc, out, err = result
    assert rc != 0, f"expected a failure, got rc=0:\n{out[-1000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "HYDRA_FULL_ERROR" not in err, err[-3000:]
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"want one error line, got {errors}:\n{err[-3000:]}"
    assert lines[-1] == errors[0], f"the error line is not last:\n{err[-3000:]}"
    for f in fragments:
        assert f in errors[0], f"{f!r} not in: {errors[0]}"
    return errors[0]


def engine_path(result: tuple[int, str, str]) -> Path:
    """The engine folder that a successful build printed as its last stdout line."""
    rc, out, err = result
    assert rc == 0, f"build failed (rc={rc}):\n{err[-3000:]}"
    last = out.strip().splitlines()[-1]
    assert last.startswith("engine: "), out[-2000:]
    path = Path(last[len("engine: "):])
    assert path.is_absolute() and path.is_dir(), last
    return path


# ---- files and stores ------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rank_digests(engine_dir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(Path(engine_dir).glob("rank*.safetensors"))}


def engines_in(store: Path) -> list[Path]:
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in NOT_ENGINES)


def assert_store_clean(store: Path) -> None:
    """Nothing half-written: no staging folders anywhere, and every engine folder has its manifest."""
    if not store.exists():
        return
    leftovers = [p for p in store.rglob(".tmp-*")]
    assert not leftovers, f"staging folders left behind: {leftovers}"
    partial = [p for p in engines_in(store) if not (p / "manifest.json").is_file()]
    assert not partial, f"engine folders without manifest.json: {partial}"


def random_checkpoint(folder: Path, kind: str, config: dict, seed: int) -> Path:
    """A transformers <kind>ForCausalLM of `config` saved to folder, with weights spread wider than the
    initializer's (logits far apart, so greedy never hinges on a near-tie)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(
        initializer_range=0.1, **config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder
