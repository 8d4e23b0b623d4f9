"""Plain helpers for the tests (fixtures live in conftest.py): references, CLI runs, store checks."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < n:
        out = model(input_ids=torch.tensor([toks[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


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


def run_module(module: str, *args, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300, raw: bool = False) -> tuple[int, str | bytes, str]:
    """python -m module args... -> (returncode, stdout, stderr); stdout as bytes when raw."""
    # tiny models: one thread (see conftest.one_thread) unless the caller's environment says otherwise
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                **(env or {})}
    # bytes pass through as they are (argv that is not UTF-8); anything else as str
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
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
