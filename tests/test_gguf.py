"""llama.cpp GGUF sources, on the real SmolLM2-135M-Instruct Q4_1 file in ../shared: the weights must
equal transformers' GGUF loader exactly, and the built engines must know the capital of France."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from engine_factory import families
from engine_factory.paths import shared_dir
from engine_factory.sources import open_source
from engine_factory.stages.convert import convert
from engine_factory.store import Store
from runtime import Engine
from runtime.errors import UserError

pytestmark = pytest.mark.slow  # ~55 s on 2 CPU cores, half of it loading transformers' model twice

REPO = Path(__file__).resolve().parents[1]
LIMITS = ["limits.max_input_len=128", "limits.max_output_len=64", "limits.max_batch_size=2"]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = shared_dir() / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is absent (set EF_SHARED_DIR to the folder holding models/)")
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")  # one store: the builds reuse test_weights' converted checkpoint


def _open(path: Path, store: Store):
    return open_source(str(path), OmegaConf.create({"config": None}), store)


def test_weights_equal_transformers_loader(gguf_file, store_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    store = Store(store_dir)
    source = _open(gguf_file, store)
    cfg = source.hf_config
    assert source.kind == "gguf" and source.name == "smollm2-135m-instruct.q4_1"
    assert source.provenance["files"].keys() == {gguf_file.name}
    assert source.tokenizer_config == {"add_bos_token": False}  # llama.cpp's flag; SmolLM2's BOS is <|im_start|>
    family = families.resolve(cfg)
    spec = family.to_spec(cfg)
    ours = convert(source, family, spec, store)

    with torch.device("meta"):  # the model only names the tensors for transformers' loader
        names = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
    theirs = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=names)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert theirs["config"][key] == cfg[key], key
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert cfg["rope_theta"] == 1e5 and cfg["tie_word_embeddings"]

    tensors = theirs["tensors"]
    assert len(tensors) == len(ours.keys()) == 2 + 9 * cfg["num_hidden_layers"]
    for hf_name, t in tensors.items():
        _, (canonical,) = family.map_name(hf_name, spec)
        mine = ours.get(canonical)
        assert mine.dtype == torch.float32 and mine.shape == t.shape, hf_name
        assert torch.equal(mine, t.float()), f"{hf_name}: max |diff| {(mine - t).abs().max()}"


def test_refuses_other_architectures(tmp_path, store_dir):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(UserError, match="tiny.gguf: GGUF architecture 'gpt2' is not supported"):
        _open(tmp_path / "tiny.gguf", Store(store_dir))


# fp32 is validated against transformers (max |dlogits| is 0 on CPU today); fp16 skips it, as loading the
# reference again would cost ~15 s for a bound (rel 7e-3 < 2e-2) that fp32 parity already implies.
@pytest.mark.parametrize("precision,validate", [("fp32", "validate.max_new_tokens=8"),
                                                ("fp16", "validate.enabled=false")])
def test_cli_build_knows_paris(gguf_file, store_dir, precision, validate):
    cmd = [sys.executable, "-m", "engine_factory", f"model.source={gguf_file}", f"precision={precision}",
           f"store={store_dir}", validate, *LIMITS]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    engine_dir = Path(run.stdout.strip().splitlines()[-1].removeprefix("engine: "))
    if precision == "fp32":
        parity = json.loads((engine_dir / "validation.json").read_text())["parity"]
        assert parity["passed"] and parity["greedy_identical"], parity
    engine = Engine.load(engine_dir)
    assert not engine.spec.add_bos_token
    assert engine.encode("The capital of France is")[0] != engine.spec.bos_token_id
    # plain completion, greedy, no chat template: " Paris.\n\nThe answer is:" in both precisions
    text = engine.generate(["The capital of France is"], max_new_tokens=8)[0].text
    assert "Paris" in text, text
