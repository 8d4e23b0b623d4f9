"""Our Triton kernels as torch.compile's mutation analysis sees them, on a machine without a GPU.

Under torch.compile, wrap_triton asks `torch._higher_order_ops.triton_kernel_wrap` which tensors a user kernel
writes: it generates the kernel's TTIR and follows the stores. torch up to at least 2.11 (the GPU machine's)
generates that TTIR with every non-tensor argument bound as a constexpr (M, N, strides: Python ints, not i32
values); a kernel whose code needs a scalar argument to be a tensor (`N.to(tl.int64)`) fails to compile there,
and torch then warns "Encountered an exception in identify_mutated_tensors, assuming every input is mutated"
and treats the weights, x and the scales as written (functionalization clones what it cannot prove untouched).
2026-12-07, H100: the int8 batch-64 GEMM with its K split summed in the kernel (REDUCE) did exactly that.

    python tests/perf/trace_probe.py     # one line a launch: compiles with scalars as constexprs? what it writes

For each launch shape the runtime uses (the launchers called on CPU tensors with the kernel launch recorded,
not run): (1) the kernel compiles for sm90 with every scalar argument a constexpr, as the analysis binds them;
(2) this torch's own analysis (identify_accessed_tensors, where it has one) names the tensors written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import runtime.attention_triton as attn  # noqa: E402
import runtime.quant.triton_w8a8 as w8a8  # noqa: E402
import runtime.quant.triton_wo as wo  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
       torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv"}


class _Recorder:
    """Stands in for wrap_triton(kernel)[grid]: records the call's arguments by name instead of launching."""

    calls: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            _Recorder.calls.append((self.kernel, {**dict(zip(self.kernel.arg_names, args)), **kwargs}))
        return record


def launches() -> list[tuple[str, object, dict]]:
    """(name, kernel, arguments) of the launch shapes the engine uses: the launchers' own defaults."""
    for mod in (wo, w8a8, attn):
        mod.wrap_triton = _Recorder
        mod._sm_count = lambda device: 132  # an H100's: the defaults' splits as on the GPU
    g = torch.Generator().manual_seed(0)
    out = []

    def take(name, fn):
        _Recorder.calls.clear()
        fn()
        out.extend((f"{name} {k.fn.__name__}", k, a) for k, a in _Recorder.calls)

    bf = torch.bfloat16
    for M in (1, 16, 64):
        for bits, K, G, dt in ((8, 4096, 1, bf), (8, 11008, 1, bf), (4, 4096, 32, bf), (4, 4096, 32, torch.float16)):
            N = 4096
            w = torch.zeros((N, K // (2 if bits == 4 else 1)), dtype=torch.int8 if bits == 8 else torch.uint8)
            s, z = torch.ones((N, G), dtype=dt).squeeze(1), torch.zeros((N, G), dtype=dt).squeeze(1)
            take(f"weight-only int{bits} {dt} M={M} K={K}",
                 lambda: wo.launch(torch.randn(M, K, generator=g).to(dt), w, s, z if bits == 4 else None, bits))
    # the batch-1 fusions ($EF_WO_FUSE=1): the norm before qkv (int8, unsplit), the gate and residual around
    # mlp.down (int4, K split in the kernel)
    for bits, K, G, kw in ((8, 4096, 1, {"norm": torch.ones(4096, dtype=bf), "eps": 1e-5}),
                           (4, 11008, 86, {"gate": True, "residual": torch.zeros(1, 4096, dtype=bf)})):
        w = torch.zeros((4096, K // (2 if bits == 4 else 1)), dtype=torch.int8 if bits == 8 else torch.uint8)
        s, z = torch.ones((4096, G), dtype=bf).squeeze(1), torch.zeros((4096, G), dtype=bf).squeeze(1)
        x = torch.randn(1, K * (2 if kw.get("gate") else 1), generator=g).to(bf)
        take(f"weight-only int{bits} {bf} M=1 K={K} fused {'+'.join(kw)}",
             lambda: wo.launch(x, w, s, z if bits == 4 else None, bits, **kw))
    # the GEMV's levels by byte permutes (inline PTX; launch turns it on for CUDA tensors only): flipped here
    out.extend((f"{name} PRMT", k, dict(a, PRMT=True)) for name, k, a in list(out) if " M=1 " in name)
    take("dequantize int4 g128", lambda: wo.dequantize(torch.zeros((4096, 2048), dtype=torch.uint8),
                                                      torch.ones(4096, 32, dtype=bf), torch.zeros(4096, 32, dtype=bf),
                                                      4))
    for M in (1, 64):
        for dt in (torch.int8, torch.float8_e4m3fn):
            x, w = torch.zeros(M, 4096, dtype=dt), torch.zeros(4096, 4096, dtype=dt)
            take(f"w8a8 {dt} M={M}", lambda: w8a8.launch(x, w, torch.ones(M, 1), torch.ones(4096), bf))
    # decode attention: split or not, rotary in the kernel; ALiBi (BLOOM); an int8 K/V cache with its scales
    for B, splits, alibi, cache, reduce in ((1, 4, False, bf, False), (1, 4, False, bf, True), (64, 1, False, bf, False),
                                            (4, 2, True, bf, False), (4, 2, False, torch.int8, False)):
        q = torch.zeros(B, 32, 128, dtype=bf)
        kv = torch.zeros(2, B, 8 if not alibi else 32, 384, 128, dtype=cache)
        rope = None if alibi else (torch.zeros(384, 128), torch.zeros(384, 128))
        slopes = torch.ones(32) if alibi else None
        kv_scale = torch.ones(2) if cache == torch.int8 else None
        take(f"decode attention B={B} splits={splits} alibi={alibi} cache={cache}" + (" reduce" if reduce else ""),
             lambda: attn.launch(q, kv[0], kv[1], torch.zeros(B, dtype=torch.int64), 0.088, slopes, kv_scale, rope,
                                 block_n=64, splits=splits, reduce=reduce))
        if not alibi and not reduce:  # $EF_KV_IN_ATTENTION=1: this step's k and v written by the kernel (K, V)
            new = (torch.zeros(B, kv.shape[2], 128, dtype=bf), torch.zeros(B, kv.shape[2], 128, dtype=bf))
            fmt = (127.0, True) if cache == torch.int8 else None
            take(f"decode attention B={B} splits={splits} cache={cache} writing k, v",
                 lambda: attn.launch(q, kv[0], kv[1], torch.zeros(B, dtype=torch.int64), 0.088, slopes, kv_scale, rope,
                                     block_n=64, splits=splits, new_kv=new, kv_format=fmt, kv=kv))
    return out


def compile_with_scalars_bound(kernel, args: dict) -> str | None:
    """Compile for sm90 with every non-tensor argument a constexpr, as torch's mutation analysis generates the
    TTIR; None when it compiles, else the error's last line."""
    opts = {k: args[k] for k in ("num_warps", "num_stages") if k in args}
    named = {k: v for k, v in args.items() if k in kernel.arg_names}
    missing = {str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor) and v.dtype not in PTR}
    if missing:
        return f"trace_probe.PTR has no Triton pointer type for {sorted(missing)}: add it"
    sig = {k: PTR[v.dtype] if isinstance(v, torch.Tensor) else "constexpr" for k, v in named.items()}
    consts = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    backend = triton.compiler.make_backend(TARGET)
    try:
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=TARGET,
                       options=backend.parse_options(opts).__dict__)
    except Exception as e:  # noqa: BLE001
        while e.__cause__ is not None:  # the innermost function's error
            e = e.__cause__
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # Triton's: the source line, a caret under it, the cause (e.g. "AttributeError("'int' object has no
        # attribute 'to'")")
        return " | ".join(lines[-3:])[:300]
    return None


def written(kernel, args: dict) -> list[str] | None:
    """The tensors this torch's analysis says the kernel writes (None: this torch has no such analysis)."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12: reads and writes
        def analyse(k, a):
            return sorted(d.name for d in wrap.identify_accessed_tensors(k, a, {}).read_writes.writes)
    elif hasattr(wrap, "identify_mutated_tensors"):  # before: the names written
        def analyse(k, a):
            return sorted(wrap.identify_mutated_tensors(k, a, {}))
    else:
        return None

    class _Sm90:  # the analysis asks the active driver for its target; there is no GPU here
        def get_current_target(self):
            return TARGET

    drivers = triton.runtime.driver
    prev = drivers._active  # (not .active: without a GPU that raises)
    drivers.set_active(_Sm90())
    try:
        return analyse(kernel, dict(args))
    finally:
        drivers._active = prev


def main() -> None:
    for name, kernel, args in launches():
        tensors = sorted(k for k, v in args.items() if isinstance(v, torch.Tensor))
        print(json.dumps({"launch": name, "error": compile_with_scalars_bound(kernel, args),
                          "written": written(kernel, args), "tensors": tensors}))


if __name__ == "__main__":
    main()
