"""GPU checks (run through the device tool): half-precision engines on CUDA match transformers, the
CUDA-graph decode path equals the eager one, and stories260K reproduces llama2.c on the GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine_factory.paths import shared_dir
from runtime import Engine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run via the device tool)")]


def _build(tmp_path, *overrides) -> str:
    r = subprocess.run([sys.executable, "-m", "engine_factory", f"store={tmp_path / 'store'}",
                        "validate.device=cuda", "limits.max_input_len=128", "limits.max_output_len=256",
                        "limits.max_batch_size=4", *overrides], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1].removeprefix("engine: ")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
                     ).save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=256, n_embd=128, n_layer=2, n_head=4)
                    ).save_pretrained(root / "gpt2")
    return root


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_parity_on_cuda(tiny_models, tmp_path, model, dtype):
    engine_dir = _build(tmp_path, f"model.source={tiny_models / model}", f"precision={dtype}")
    v = json.loads(open(f"{engine_dir}/validation.json").read())["parity"]
    assert v["passed"] and v["device"].startswith("cuda"), v


def _assert_generates_as_eager(engine_dir: str, fast: Engine, new_tokens: int) -> None:
    """fast (CUDA graphs, maybe compiled) and a plain eager engine on the same files: the same tokens."""
    prompts = [[5, 6, 7], list(range(10, 40)), [100]]
    eager = Engine.load(engine_dir, device="cuda")
    eager.use_cuda_graphs = False
    a = fast.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    b = eager.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    assert [g.output_ids for g in a] == [g.output_ids for g in b]


def test_cuda_graph_decode_equals_eager(tiny_models, tmp_path):
    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", "precision=fp16")
    graphed = Engine.load(engine_dir, device="cuda")
    _assert_generates_as_eager(engine_dir, graphed, 48)
    assert graphed._graphs, "the CUDA-graph path was not taken"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_stories260k_on_cuda(tmp_path, dtype):
    src = shared_dir() / "models" / "stories260K"
    if not src.is_dir():
        pytest.skip(f"{src} is absent (set EF_SHARED_DIR)")
    engine_dir = _build(tmp_path, f"recipe=stories260k_{dtype}")  # and the recipe's expect.validation bounds
    v = json.loads(open(f"{engine_dir}/validation.json").read())["parity"]
    assert v["passed"], v
    if dtype == "fp32":
        out = subprocess.run([sys.executable, "-m", "runtime.run", "--engine_dir", engine_dir, "--device", "cuda",
                              "--input_text", "Once upon a time", "--max_output_len", "196", "--temperature", "0"],
                             capture_output=True, text=True, check=True).stdout
        assert out == (src / "reference_greedy.txt").read_text()


def test_dummy_weights_are_validated_with_the_reference_on_the_gpu(tmp_path):
    arch = ("+model.config={architectures:[LlamaForCausalLM],model_type:llama,vocab_size:512,hidden_size:256,"
            "intermediate_size:512,num_hidden_layers:2,num_attention_heads:8,num_key_value_heads:4,"
            "max_position_embeddings:512}")
    engine_dir = _build(tmp_path, "model.source=dummy", arch, "precision=fp16")
    v = json.loads(open(f"{engine_dir}/validation.json").read())["parity"]
    assert v["passed"] and v["device"].startswith("cuda") and v["reference_device"].startswith("cuda"), v


def test_compiled_cuda_graph_decode_equals_eager(tiny_models, tmp_path):
    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", "precision=fp32")
    compiled = Engine.load(engine_dir, device="cuda").compile()
    _assert_generates_as_eager(engine_dir, compiled, 48)
    assert compiled._graphs, "the CUDA-graph path was not taken"


def test_compiled_decode_with_inductor_options_equals_eager(tiny_models, tmp_path):
    """runtime.bench --inductor combo_kernels=true: Inductor launches independent kernels of a layer as one (the
    rotary, K and V writes); a speed knob, the same tokens."""
    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", "precision=fp32")
    _assert_generates_as_eager(engine_dir, Engine.load(engine_dir, device="cuda").compile({"combo_kernels": True}), 32)


def test_int8_weight_only_on_cuda_compiled_equals_eager(tiny_models, tmp_path):
    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", "precision=int8_wo",
                        "precision.dtype=fp32")
    assert json.loads(open(f"{engine_dir}/validation.json").read())["parity"]["passed"]
    _assert_generates_as_eager(engine_dir, Engine.load(engine_dir, device="cuda").compile(), 32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_decode_with_programmatic_dependent_launch_equals_eager(tiny_models, tmp_path, dtype):
    """The compiled decode step's default on sm >= 90 (Inductor's kernels launched with programmatic dependent
    launch: each may start before the one before it ends, and waits before it reads), an int8 engine, each prompt
    alone (batch 1, where the int8 GEMV runs) and together: fp32 gives the plain eager engine's tokens; bf16 (where
    Inductor's fused arithmetic rounds unlike eager's) the tokens of the same compiled step with the option off,
    the same kernels launched the plain way, at batch 1 only (two compiled engines; with batch 3 too, its four
    compiles outlasted the device calls' 130-150 s test limit on 2026-12-07, three times)."""
    import torch._inductor.config as inductor_config

    cap = torch.cuda.get_device_capability()
    if cap[0] < 9 or not hasattr(inductor_config, "triton.enable_pdl"):
        pytest.skip(f"programmatic dependent launch needs a GPU of sm >= 90 (Hopper or later) and torch >= 2.10; "
                    f"this is sm {cap[0]}{cap[1]} with torch {torch.__version__}: the default is off here")
    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", "precision=int8_wo",
                        f"precision.dtype={dtype}")
    fast = Engine.load(engine_dir, device="cuda").compile()
    assert fast.inductor_options.get("triton.enable_pdl") is True
    if dtype == "fp32":
        ref = Engine.load(engine_dir, device="cuda")
        ref.use_cuda_graphs = False
    else:
        ref = Engine.load(engine_dir, device="cuda").compile({"triton.enable_pdl": False})
        assert ref.inductor_options["triton.enable_pdl"] is False
    prompts = [[5, 6, 7], list(range(10, 40)), [100]]
    for batch in [[p] for p in prompts] + ([prompts] if dtype == "fp32" else []):
        a = fast.generate(batch, max_new_tokens=32, ignore_eos=True)
        b = ref.generate(batch, max_new_tokens=32, ignore_eos=True)
        assert [g.output_ids for g in a] == [g.output_ids for g in b]
    assert fast._graphs, "the CUDA-graph path was not taken"


@pytest.mark.parametrize("head", [False, True], ids=["float_head", "quant_head"])
@pytest.mark.parametrize("precision", ["int8_wo", "int4_wo_g128"])
def test_fused_weight_only_decode_equals_eager(tiny_models, tmp_path, precision, head, monkeypatch):
    """$EF_WO_FUSE=1: the batch-1 decode step compiled with the norms, gated activation and residual adds inside the
    weight-only GEMV (runtime/quant/triton_wo.py fused_linear) gives the tokens of the plain eager engine, unfused,
    each prompt alone (fp32: the kernels' bf16 / fp16 forms, PRMT's among them, are test_gemv_fusions_on_cuda's);
    quant_head: the lm_head quantized too (precision.quant_lm_head), the final norm inside its GEMV."""
    from runtime.quant import triton_wo

    engine_dir = _build(tmp_path, f"model.source={tiny_models / 'llama'}", f"precision={precision}",
                        "precision.dtype=fp32", f"precision.quant_lm_head={str(head).lower()}")
    prompts = [[5, 6, 7], list(range(10, 40)), [100]]
    monkeypatch.setattr(triton_wo, "FUSE", True)
    fast = Engine.load(engine_dir, device="cuda").compile()
    linears = [lin for layer in fast.model.layers for lin in (layer.qkv, layer.o, layer.up, layer.down)]
    assert all(lin.fuses for lin in linears + ([fast.model.quant_head] if head else []))
    assert (fast.model.quant_head is not None) == head
    got = [fast.generate([p], max_new_tokens=32, ignore_eos=True)[0].output_ids for p in prompts]
    assert fast._graphs, "the CUDA-graph path was not taken"
    monkeypatch.setattr(triton_wo, "FUSE", False)
    ref = Engine.load(engine_dir, device="cuda")
    ref.use_cuda_graphs = False
    assert got == [ref.generate([p], max_new_tokens=32, ignore_eos=True)[0].output_ids for p in prompts]
