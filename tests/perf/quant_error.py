"""Where a quant mode's error sits in a real model (a measurement, not a test): per layer and per linear, the
relative error of the quantized weight, of the linear's output on real activations, and (modes that quantize
activations) of its quantized input; per layer the K / V error of a quantized KV cache.

    python tests/perf/quant_error.py --engine_dir <fp32 engine> --stats <store>/.cache/calibrate/<key>/stats.safetensors \
        [--modes int4_wo_g64 sq_per_token_per_channel sq fp8 --kv int8 fp8 --samples 4 --seq_len 512 --json_out F]

The float engine (quant none, fp32) runs a few articles of the dataset (articles 50.. by default: not the 50
that summarize scores); hooks at each linear's input compare, on those inputs, x W^T with the mode's own
runtime linear built from the mode's own quantize() of W (each linear alone, in the float model's
activations: the errors do not compound here). Relative errors are Frobenius: ||a - b|| / ||b||.
SmoothQuant: the smoothed linears (precision.sq_alpha, DEFAULT_SMOOTH) get W diag(s) and x diag(s)^-1 as the
build folds them; act_err is the smoothed input's quantization error and act_err_raw the same quantizer on
the unsmoothed input (what smoothing buys). KV: K after rotary and V, quantized with the calibrated
per-layer scale of the format, as the cache stores them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from runtime import Engine  # noqa: E402
from runtime.kv_cache import KV_FORMATS, dequantize as kv_dequantize  # noqa: E402
from runtime.quant import MODES  # noqa: E402
from runtime.quant.fp8 import to_e4m3  # noqa: E402
from runtime.quant.int4_wo import dequantize as int4_dequantize  # noqa: E402
from runtime.quant.sq import DEFAULT_SMOOTH, smoothing_scale  # noqa: E402
from runtime.summarize import load_articles  # noqa: E402

LINEARS = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")


# the float weight each mode's stored tensors stand for (by mode-name prefix)
def _deq_int8(t):
    return t["weight"].float() * t["scale"].float()[:, None]


def _deq_int4(t):
    return int4_dequantize(t["weight"], t["scale"], t["zero"], torch.float32)


def _deq_scaled(t):
    return t["weight"].float() * t["weight_scale"].float().reshape(-1, 1)


DEQUANTIZE = {"int8_wo": _deq_int8, "int4_wo": _deq_int4, "fp8": _deq_scaled, "sq": _deq_scaled}


def _act_quant(mode: str, lin, x):
    """The input the quantized GEMM sees, dequantized (None: a weight-only mode)."""
    if mode.startswith("sq"):
        q, a = lin.quantize_input(x)
        return q.float() * a
    if mode == "fp8":
        return to_e4m3(x, lin.input_scale).float() * lin.input_scale
    return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


class Quantized:
    """One mode's quantized linears of the whole model, and the smoothing of its smoothed inputs."""

    def __init__(self, mode: str, weights: dict, stats: dict, alpha: float):
        self.mode, self.qmode = mode, MODES[mode]
        deq = next(f for p, f in DEQUANTIZE.items() if mode.startswith(p))
        self.linears, self.s, self.weight_err = {}, {}, {}
        for name, w in weights.items():
            st = dict(stats.get(name, {}))
            if mode.startswith("sq") and name.split(".", 2)[2] in DEFAULT_SMOOTH:
                self.s[name] = s = smoothing_scale(st["input_absmax"], w, alpha)  # (in,)
                w, st["input_absmax"] = w * s, st["input_absmax"] / s
            q = self.qmode.quantize(w, torch.float32, st or None)
            self.weight_err[name] = rel(deq(q), w)
            self.linears[name] = self.qmode.linear(q)
            if mode.startswith("sq"):  # the same quantizer on the unsmoothed input, for act_err_raw
                raw = dict(stats.get(name, {}))
                self.linears[name + ":raw"] = self.qmode.linear(self.qmode.quantize(weights[name], torch.float32, raw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine_dir", required=True, help="the fp32 float engine (quant none)")
    ap.add_argument("--stats", required=True, help="calibrate's stats.safetensors (input_absmax, k/v_absmax)")
    ap.add_argument("--dataset", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                                                      "cnn_dailymail_test100.jsonl"))
    ap.add_argument("--modes", nargs="*", default=["int8_wo", "int4_wo_g64", "int4_wo", "fp8", "sq",
                                                   "sq_per_token_per_channel"])
    ap.add_argument("--kv", nargs="*", default=["int8", "fp8"])
    ap.add_argument("--sq_alpha", type=float, default=0.5)
    ap.add_argument("--first_article", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--top", type=int, default=8, help="the tensors of largest output error to list per mode")
    ap.add_argument("--json_out")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from safetensors.torch import load_file

    eng = Engine.load(a.engine_dir, device="cpu", verify="size")
    assert eng.config["quant"]["mode"] == "none" and eng.config["dtype"] == "float32", "pass the fp32 float engine"
    tensors = load_file(os.path.join(a.engine_dir, "rank0.safetensors"))
    n_layers = eng.spec.num_layers
    weights = {f"layers.{i}.{lin}": tensors[f"layers.{i}.{lin}.weight"].float()
               for i in range(n_layers) for lin in LINEARS}
    stats: dict = defaultdict(dict)
    for flat, t in load_file(a.stats).items():
        name, stat = flat.rsplit(".", 1)
        stats[name][stat] = t
    quant = {m: Quantized(m, weights, stats, a.sq_alpha) for m in a.modes}

    # accumulated squared norms: out[(mode, name)] = [err2, ref2]; act[(mode, name, kind)] = [err2, ref2]
    out = defaultdict(lambda: [0.0, 0.0])
    act = defaultdict(lambda: [0.0, 0.0])
    kv = defaultdict(lambda: [0.0, 0.0])

    def acc(d, key, got, want):
        d[key][0] += float((got.double() - want.double()).pow(2).sum())
        d[key][1] += float(want.double().pow(2).sum())

    class Hook:
        fuses = False  # (runtime/model.py would call a linear's fused form, past __call__ below)

        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def __call__(self, x):
            y = self.inner(x)  # (T, out) the float linear
            for m, q in quant.items():
                s = q.s.get(self.name)
                xs = x if s is None else x / s  # what the smoothed norm hands the linear
                lin = q.linears[self.name]
                acc(out, (m, self.name), lin(xs), y)
                xq = _act_quant(m, lin, xs)
                if xq is not None:
                    acc(act, (m, self.name, "act_err"), xq, xs)
                if m.startswith("sq"):
                    acc(act, (m, self.name, "act_err_raw"), _act_quant(m, q.linears[self.name + ":raw"], x), x)
            return y

    model = eng.model
    for i, layer in enumerate(model.layers):
        for lin in LINEARS:
            attr = lin.split(".")[1]
            setattr(layer, attr, Hook(getattr(layer, attr), f"layers.{i}.{lin}"))
    qkv, index = model._qkv, {id(layer): i for i, layer in enumerate(model.layers)}

    def observed_qkv(layer, x, *args, **kw):
        q, k, v = qkv(layer, x, *args, **kw)  # (T, n, hd)
        i = index[id(layer)]
        st = stats[f"layers.{i}.attn"]
        for f in a.kv:
            fmt = KV_FORMATS[f]
            sk, sv = fmt.scales(float(st["k_absmax"].max()), float(st["v_absmax"].max())).unbind()
            for kind, t, sc in (("k", k, sk), ("v", v, sv)):
                acc(kv, (f, i, kind), kv_dequantize(fmt.quantize(t, sc, fmt.storage), sc, torch.float32), t)
        return q, k, v

    model._qkv = observed_qkv

    rows = load_articles(a.dataset, None, None, ("article", "highlights"), a.first_article + a.samples)
    texts = [r["article"] for r in rows[a.first_article:a.first_article + a.samples]]
    with torch.inference_mode():
        for text in texts:
            ids = eng.encode(text)[:a.seq_len]
            eng.score(ids)

    report = {"engine": a.engine_dir, "samples": len(texts), "seq_len": a.seq_len, "sq_alpha": a.sq_alpha,
              "linears": {}, "kv": {}}
    for m, q in quant.items():
        rows_m = []
        for name in weights:
            e, r = out[(m, name)]
            row = {"tensor": name, "weight_err": q.weight_err[name], "out_err": (e / r) ** 0.5}
            for kind in ("act_err", "act_err_raw"):
                if (m, name, kind) in act:
                    e2, r2 = act[(m, name, kind)]
                    row[kind] = (e2 / r2) ** 0.5
            rows_m.append(row)
        report["linears"][m] = rows_m
    for (f, i, kind), (e, r) in sorted(kv.items()):
        report["kv"].setdefault(f, {}).setdefault(f"layers.{i}", {})[kind] = (e / r) ** 0.5

    # ---- print: per linear kind (mean and max over layers), the worst tensors, then per layer --------------
    for m, rows_m in report["linears"].items():
        print(f"\n== {m}: relative error per linear (weight / output on real activations"
              + (" / input quantization, smoothed and raw" if any("act_err" in r for r in rows_m) else "") + ")")
        keys = [k for k in ("weight_err", "out_err", "act_err", "act_err_raw") if k in rows_m[0]]
        print(f"{'linear':10s}" + "".join(f" {k + ' mean':>15s} {k + ' max':>15s}" for k in keys))
        for lin in LINEARS:
            sel = [r for r in rows_m if r["tensor"].endswith(lin)]
            print(f"{lin:10s}" + "".join(f" {sum(r[k] for r in sel) / len(sel):15.4f} {max(r[k] for r in sel):15.4f}"
                                         for k in keys))
        print("largest output errors:")
        for r in sorted(rows_m, key=lambda r: -r["out_err"])[:a.top]:
            print(f"  {r['tensor']:22s} " + " ".join(f"{k}={r[k]:.4f}" for k in keys))
        print("per layer (out_err): " + "  ".join(
            f"{i}:" + "/".join(f"{r['out_err']:.3f}" for r in rows_m if r["tensor"].startswith(f"layers.{i}."))
            for i in range(n_layers)) + "   (qkv/o/up/down)")
    for f, layers in report["kv"].items():
        print(f"\n== kv {f}: relative error of K / V per layer")
        print("  ".join(f"{n.split('.')[1]}:{d['k']:.4f}/{d['v']:.4f}" for n, d in layers.items()))
        print(f"mean K {sum(d['k'] for d in layers.values()) / len(layers):.4f} V "
              f"{sum(d['v'] for d in layers.values()) / len(layers):.4f}; max K {max(d['k'] for d in layers.values()):.4f} "
              f"V {max(d['v'] for d in layers.values()):.4f}")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
