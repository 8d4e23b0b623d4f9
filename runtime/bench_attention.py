"""python -m runtime.bench_attention: decode attention per layer-call, torch SDPA over the cache vs Triton.

LLaMA-2-7B shapes by default (32 heads, 32 KV heads, head_dim 128, bf16), a static cache of --seq_len
positions with every row live up to --live. Each timing is a CUDA graph of one call per layer over
--layers distinct caches (so K/V come from HBM, not L2), replayed; µs per layer-call is the median
replay over the layer count. GB/s counts the live K/V bytes only (what a kernel must read). Prints a
table, writes JSON lines to --out. A benchmark: never a timed test.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import torch.nn.functional as F

from .attention import DECODE_ATTENTION
from .dtypes import DTYPES



def time_graph(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of fn()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(dev, gb: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second: the ceiling for a kernel that streams K/V."""
    n = int(gb * 1e9 / 2)
    x = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    y = torch.empty_like(x)
    return 2 * n / time_graph(lambda: y.copy_(x), reps=10)


def case(B: int, live: int, S: int, nh: int, nkv: int, hd: int, dtype, layers: int, sweep: bool, dev) -> list[dict]:
    from . import attention_triton as at

    layer_bytes = 2 * B * nkv * S * hd * dtype.itemsize
    layers = max(2, min(layers, int(40e9 // layer_bytes)))
    g = torch.Generator(device=dev).manual_seed(0)
    ks = [torch.randn(B, nkv, S, hd, device=dev, dtype=dtype, generator=g) for _ in range(layers)]
    vs = [torch.randn(B, nkv, S, hd, device=dev, dtype=dtype, generator=g) for _ in range(layers)]
    q = torch.randn(B, nh, hd, device=dev, dtype=dtype, generator=g)
    pos = torch.full((B,), live - 1, device=dev, dtype=torch.long)
    live_bytes = 2 * B * nkv * live * hd * dtype.itemsize
    base = {"B": B, "live": live, "S": S, "nh": nh, "nkv": nkv, "hd": hd, "dtype": str(dtype).split(".")[-1],
            "layers_timed": layers, "live_kv_MB": round(live_bytes / 1e6, 2)}
    rows = []

    def record(impl: str, fn, **extra):
        t = time_graph(lambda: [fn(k, v) for k, v in zip(ks, vs)]) / layers
        rows.append({**base, "impl": impl, **extra, "us_per_layer": round(t * 1e6, 2),
                     "live_GB_s": round(live_bytes / t / 1e9, 1)})

    torch_entry = DECODE_ATTENTION["torch"]
    mask = torch_entry.prepare(pos, S, None, dtype)
    record("torch_sdpa_masked_cache", lambda k, v: torch_entry.attend(q, k, v, pos, mask))
    rows[-1]["prepare_us_per_step"] = round(time_graph(lambda: torch_entry.prepare(pos, S, None, dtype)) * 1e6, 2)
    # what an exact-length SDPA would cost (all rows one length, host-known: not graph-safe in the decoder)
    record("torch_sdpa_sliced_live", lambda k, v: F.scaled_dot_product_attention(
        q[:, :, None], k[:, :, :live], v[:, :, :live])[:, :, 0])
    cfg = at.default_config(B, nh, nkv, S, hd, q.device)
    ref = torch_entry.attend(q, ks[0], vs[0], pos, mask).float()
    out = at.decode_attention(q, ks[0], vs[0], pos, hd ** -0.5, None).float()
    err = (out - ref).abs().max().item()
    record("triton", lambda k, v: at.decode_attention(q, k, v, pos, hd ** -0.5, None), config=cfg,
           max_abs_err_vs_torch=err)
    if cfg["splits"] > 1:  # the splits combined in the split kernel (EF_ATTN_REDUCE=1) beside the second kernel
        c = {**cfg, "reduce": True}
        err = (at.launch(q, ks[0], vs[0], pos, hd ** -0.5, None, **c).float() - ref).abs().max().item()
        record("triton_reduce", lambda k, v: at.launch(q, k, v, pos, hd ** -0.5, None, **c), config=c,
               max_abs_err_vs_torch=err)
    if sweep:
        for block_n, warps, stages, mult in itertools.product([32, 64, 128], [4, 8], [2, 3], [0.5, 1, 2]):
            splits = max(1, int(round(cfg["splits"] * mult)))
            c = {"block_n": block_n, "num_warps": warps, "num_stages": stages, "splits": splits}
            try:
                record("triton_sweep", lambda k, v: at.launch(q, k, v, pos, hd ** -0.5, None, **c), config=c)
            except Exception as e:  # e.g. out of shared memory for a large block
                rows.append({**base, "impl": "triton_sweep", "config": c, "error": str(e).splitlines()[0][:200]})
    del ks, vs
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m runtime.bench_attention", description=__doc__)
    p.add_argument("--batch_size", type=int, action="append", help="repeatable (default 1 and 64)")
    p.add_argument("--live", type=int, action="append", help="live positions per row, repeatable (default 384, 2300)")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    p.add_argument("--out", help="JSON lines file")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = [{"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
             "copy_GB_s": round(copy_bandwidth(dev) / 1e9, 1)}]
    for B, live in itertools.product(args.batch_size or [1, 64], args.live or [384, 2300]):
        rows += case(B, live, args.seq_len, args.heads, args.kv_heads, args.head_dim, DTYPES[args.dtype],
                     args.layers, args.sweep, dev)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(json.dumps(rows[0]))
    best = {}
    for r in rows[1:]:
        if r.get("impl") == "triton_sweep" and "us_per_layer" in r:
            key = (r["B"], r["live"])
            best[key] = min(best.get(key, r), r, key=lambda x: x["us_per_layer"])
    for r in rows[1:]:
        if r["impl"] != "triton_sweep":
            print(f"B={r['B']:3d} live={r['live']:5d} {r['impl']:26s} {r['us_per_layer']:9.2f} us "
                  f"{r['live_GB_s']:8.1f} GB/s {r.get('config', '')} {r.get('max_abs_err_vs_torch', '')}")
    for (B, live), r in sorted(best.items()):
        print(f"B={B:3d} live={live:5d} best sweep {r['us_per_layer']:9.2f} us {r['live_GB_s']:8.1f} GB/s {r['config']}")


if __name__ == "__main__":
    main()
