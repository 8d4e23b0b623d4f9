"""Fixtures: tiny HF checkpoints made with real transformers classes and random weights (session-scoped:
made once; a test that changes one copies it first), stores, and CLI runners. Helpers: helpers.py."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import run_module


def pytest_configure(config):
    # No hub here, and no test may wait for one (huggingface_hub reads this when imported). The runtime's
    # cache of verified files goes to a temporary folder, not ~/.cache. Subprocesses inherit both.
    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = tempfile.mkdtemp(prefix="ef-test-cache-")
    os.environ["EF_CACHE_DIR"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    # Without a GPU the Triton kernels' tests run in Triton's interpreter, which is chosen when triton is first
    # imported: set here, before any test (or torch.compile) imports it in this process or an xdist worker
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors: OpenMP threads spinning for a core of a busy
    2-core machine made each small matmul ~100x slower. (Subprocesses: helpers.run_module.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- the shared folder -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared() -> Path:
    from engine_factory.paths import shared_dir

    return shared_dir()


@pytest.fixture(scope="session")
def need_shared(shared):
    """need_shared("models/stories260K") -> that path, or skip the test with the reason."""
    def need(rel: str) -> Path:
        path = shared / rel
        if not path.exists():
            pytest.skip(f"{path} is absent (set EF_SHARED_DIR to the shared data folder)")
        return path
    return need


# ---- tiny checkpoints ------------------------------------------------------------------------------
def _llama(folder: Path, seed: int, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
               # wider than the default 0.02: logits spread out, so greedy never hinges on a near-tie
               initializer_range=0.1, bos_token_id=1, eos_token_id=2,
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0})  # not the default theta
    cfg.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """LLaMA with GQA (8 heads / 2 KV heads), tied embeddings, vocab 512, no tokenizer files."""
    return _llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", seed=0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama_mha(tmp_path_factory) -> Path:
    """LLaMA with MHA (4 heads = 4 KV heads), a separate lm_head, and q/k/v/o biases."""
    return _llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama-mha", seed=1, vocab_size=384,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                  attention_bias=True)


@pytest.fixture(scope="session")
def gpt2_tokenizer(need_shared):
    """OpenAI's GPT-2 BPE tokenizer from the shared folder."""
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(str(need_shared("tokenizers/gpt2")))
    assert tok("The capital of France is")["input_ids"] == [464, 3139, 286, 4881, 318]
    return tok


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, request, shared) -> Path:
    """GPT-2 with the real vocabulary (50257), 2 layers of width 32, and the real GPT-2 tokenizer when
    the shared folder has it (tests of text prompts ask for gpt2_tokenizer, and skip without it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    if (shared / "tokenizers" / "gpt2").is_dir():
        request.getfixturevalue("gpt2_tokenizer").save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory, need_shared) -> Path:
    """A tokenizer folder that fits the tiny LLaMA's 512 ids: stories260K's SentencePiece model."""
    from transformers import LlamaTokenizer

    out = tmp_path_factory.mktemp("tok") / "llama-tokenizer"
    LlamaTokenizer.from_pretrained(str(need_shared("models/stories260K"))).save_pretrained(str(out))
    return out


# ---- stores and command lines ------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> Path:
    """A fresh, empty store folder for one test."""
    return tmp_path / "store"


@pytest.fixture
def cli(tmp_path):
    """cli(*args) -> (returncode, stdout, stderr) of `python -m engine_factory args`, run elsewhere
    than the checkout (it must work from any directory)."""
    def run(*args, env: dict | None = None, timeout: float = 300):
        return run_module("engine_factory", *args, cwd=tmp_path, env=env, timeout=timeout)
    return run


@pytest.fixture
def run_engine(tmp_path):
    """run_engine(*args) -> (returncode, stdout, stderr) of `python -m runtime.run args` (stdout as
    bytes with raw=True)."""
    def run(*args, env: dict | None = None, timeout: float = 300, raw: bool = False):
        return run_module("runtime.run", *args, cwd=tmp_path, env=env, timeout=timeout, raw=raw)
    return run
