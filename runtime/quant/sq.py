"""sq: SmoothQuant W8A8 (Xiao et al. 2023; the seeds' `--smoothquant ALPHA [--per_token] [--per_channel]`).

Build half. `prepare` smooths the world-1 tensors before anything is quantized or sharded (so every tp
gives the same numbers): for each smoothed linear (setting sq_smooth: attn.qkv and mlp.up by default,
the linears right after a norm; mlp.down of a gated MLP optional) and each of its input channels j,
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
(max|X_j| from calibration, max|W_:,j| over all output rows: the fused q|k|v, gate|up), the preceding
norm's weight and bias (LayerNorm families) are divided by s and the weight's columns multiplied by s:
(x / s) (W diag(s))^T = x W^T, with the activation's outliers moved into the weight. mlp.down of a gated
MLP folds 1/s into up's rows instead (act(gate) * up / s). attn.o (input: attention over V) and the
down of an act(up) MLP are quantized W8A8 without smoothing (see README).
`quantize` rounds the (smoothed) weight to int8, one scale per tensor or per output channel, and, for
static activations, stores the per-tensor activation scale max|X / s| / 127 from calibration.

Runtime half (W8A8Linear): x is quantized to int8 with the static scale or one scale per token (its
abs-max / 127; a row-parallel shard takes the max over the tp group: one small all-reduce), the int8 x
int8 product accumulates in int32 and the epilogue multiplies by (activation scale x weight scale).
CPU: the exact integer product through float64 (every int32 sum of int8 products is exact in float64);
CUDA ($EF_WO_KERNEL=auto): up to triton_w8a8.SMALL_M rows (decode) the Triton int8 GEMM with the epilogue
fused (runtime/quant/triton_w8a8.py), above (prefill) torch._int_mm (cuBLASLt int8), padded to the shapes
it takes; $EF_WO_KERNEL=triton: the Triton GEMM at every size, =torch: torch._int_mm at every size. Every
path computes the same exact int32 and runs the same epilogue.

Modes, by the runtime choices (the name is engine.json's quant mode; precision=sq resolves
precision.per_token / precision.per_channel to it): sq, sq_per_channel, sq_per_token, sq_per_token_per_channel.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import QuantMode, Stored, register, select_kernel

QMAX = 127.0
TINY = torch.finfo(torch.float32).tiny  # a scale is never 0 (an all-zero input stays finite)
# a smoothed linear -> the norm right before it (runtime names of layer i)
NORM_BEFORE = {"attn.qkv": "attn_norm", "mlp.up": "mlp_norm"}
DEFAULT_SMOOTH = ("attn.qkv", "mlp.up")
SMOOTHABLE = ("attn.qkv", "mlp.up", "mlp.down")  # mlp.down: gated MLPs only (1/s into up's rows)


def mode_name(per_token: bool, per_channel: bool) -> str:
    return "sq" + ("_per_token" if per_token else "") + ("_per_channel" if per_channel else "")


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (in,) fp32 for a (out, in) weight whose input's per-channel abs-max is act_absmax (in,)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def int8_matmul(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) int32, exact: the CPU reference (float64 holds every partial
    sum of K products of at most 127 * 127 exactly)."""
    return (q.double() @ weight.double().T).to(torch.int32)


def _pad_to(n: int, multiple: int, least: int = 0) -> int:
    return max(least, -(-n // multiple) * multiple)


class W8A8Linear:
    """y = (int8(x / a) Wq^T) * (a * w) + b, with a the activation scale ((1,) static or (M, 1) per token)
    and w the weight scale ((1,) or (out,))."""

    def __init__(self, tensors: dict[str, torch.Tensor], per_token: bool):
        self.weight = tensors["weight"]  # (out, in) int8
        self.weight_scale = tensors["weight_scale"].float()  # (out,) or (1,)
        self.act_scale = None if per_token else tensors["act_scale"].float()  # (1,)
        self.bias = tensors.get("bias")
        # a row-parallel linear's per-token abs-max is over this rank's input features: the decoder sets this to
        # the tp group's max (runtime/model.py _RowParallel), so every tp quantizes a token as tp1 does
        self.row_max = None
        self.out_features, self.in_features = self.weight.shape
        self.cuda = self.weight.device.type == "cuda"
        self.kernel = select_kernel(self.weight.device)  # CPU: torch (the reference); CUDA: cuda | triton | torch
        if self.cuda and self.kernel != "triton":
            # torch._int_mm takes K and N in multiples of 8: zero columns / rows add nothing
            n, k = _pad_to(self.out_features, 8), _pad_to(self.in_features, 8)
            w = F.pad(self.weight, (0, k - self.in_features, 0, n - self.out_features))
            self.weight_t = w.t()  # (K, N) column-major: the layout cuBLASLt's int8 GEMM wants for B

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, in) -> (int8 (M, in), fp32 scale (1,) or (M, 1))."""
        xf = x.float()
        if self.act_scale is not None:
            a = self.act_scale
        else:
            amax = xf.abs().amax(dim=-1, keepdim=True)  # (M, 1)
            a = ((amax if self.row_max is None else self.row_max(amax)) / QMAX).clamp(min=TINY)
        return torch.round(xf / a).clamp(-QMAX, QMAX).to(torch.int8), a

    def _int_mm(self, q: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return int8_matmul(q, self.weight)
        m, k = q.shape
        mp = _pad_to(m, 8, least=24)  # cuBLASLt: M > 16
        if mp != m or self.weight_t.shape[0] != k:  # (no copy when the shapes already fit)
            q = F.pad(q, (0, self.weight_t.shape[0] - k, 0, mp - m))
        y = torch._int_mm(q, self.weight_t)
        return y if (mp, y.shape[1]) == (m, self.out_features) else y[:m, :self.out_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, a = self.quantize_input(x.reshape(-1, shape[-1]))
        y = None
        if self.kernel in ("cuda", "triton"):
            from . import triton_w8a8

            if self.kernel == "triton" or q.shape[0] <= triton_w8a8.SMALL_M:  # the same int32, the same epilogue
                y = triton_w8a8.w8a8_linear(q, self.weight, a, self.weight_scale, x.dtype)
        if y is None:
            y = (self._int_mm(q).float() * (a * self.weight_scale)).to(x.dtype)  # (M, out)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class _Smoothing:
    """The smoothing of one linear: its weight's columns times s, and 1/s folded into what makes its input
    (`folds`: tensor name -> the rows of it that produce the input: a norm's weight and bias whole, the up
    half of a gated mlp.up's rows). From world-1 sources; s is computed once (reading the whole weight
    once), the smoothed tensors each time they are read (only s is kept)."""

    def __init__(self, sources, stats, linear: str, folds: dict[str, slice], alpha: float):
        self.sources, self.stats, self.linear, self.folds, self.alpha = sources, stats, linear, folds, alpha
        self._s = None

    def _read(self, name: str) -> torch.Tensor:
        source = self.sources[name]
        return (source.whole() if hasattr(source, "whole") else source).float()

    def s(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self._s is None:
            if self.stats is None or self.linear not in self.stats:
                raise ValueError(f"{self.linear}: SmoothQuant needs calibration statistics (input_absmax)")
            w = weight if weight is not None else self._read(f"{self.linear}.weight")
            self._s = smoothing_scale(self.stats[self.linear]["input_absmax"], w, self.alpha)
        return self._s

    def tensor(self, name: str) -> torch.Tensor:
        t = self._read(name)
        if name == f"{self.linear}.weight":
            return t * self.s(t)[None, :]  # (out, in): columns times s
        rows, s = self.folds[name], self.s()
        t = t.clone()
        t[rows] = t[rows] / (s[:, None] if t.dim() == 2 else s)  # the rows making input channel j, over s_j
        return t

    def input_stats(self) -> dict:
        return {**self.stats[self.linear], "input_absmax": self.stats[self.linear]["input_absmax"].float() / self.s()}


class _SmoothedTensor:
    """A world-1 tensor (Sliceable, like build's fused sources) that is read through a _Smoothing."""

    def __init__(self, smoothing: _Smoothing, name: str, shape):
        self.smoothing, self.name, self.shape = smoothing, name, tuple(shape)

    def whole(self) -> torch.Tensor:
        return self.smoothing.tensor(self.name)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.whole().narrow(dim, start, length)


class _SmoothedStats(Mapping):
    """Calibration statistics with each smoothed linear's input abs-max divided by its s (computed when read)."""

    def __init__(self, stats, smoothings: dict[str, _Smoothing]):
        self.base, self.smoothings = stats or {}, smoothings

    def __getitem__(self, key):
        return self.smoothings[key].input_stats() if key in self.smoothings else self.base[key]

    def __iter__(self):
        return iter(set(self.base) | set(self.smoothings))

    def __len__(self):
        return len(set(self.base) | set(self.smoothings))


class SmoothQuant(QuantMode):
    needs_calibration = True
    settings_keys = ("sq_alpha", "sq_smooth", "per_token", "per_channel")
    # validate's (max_rel_logits, min_token_agreement) by (per_token, per_channel). Measured on SmolLM2-135M
    # (fp32 float part, default smoothing, 16 x 512 calibration tokens): per token + per channel 0.20 / 0.92
    # (0.14 / 0.98 with mlp.down smoothed), per token 0.30 / 0.81; a static per-tensor activation scale
    # breaks on it (0.73 / 0.50 per channel, 0.93 / 0.54 per tensor: one scale over outlier channels of
    # abs-max ~500), so those bounds fail such an engine rather than pass it. Tiny dummies: ~0.02 / 0.98.
    BOUNDS = {(True, True): (0.3, 0.85), (True, False): (0.45, 0.7), (False, True): (0.5, 0.6), (False, False): (0.5, 0.6)}

    def __init__(self, per_token: bool, per_channel: bool):
        self.per_token, self.per_channel = per_token, per_channel
        self.name = mode_name(per_token, per_channel)
        self.bounds = self.BOUNDS[per_token, per_channel]

    def check(self, settings: dict, spec=None) -> str | None:
        alpha, smooth = settings["sq_alpha"], list(settings["sq_smooth"])
        if not 0.0 <= alpha <= 1.0:
            return f"precision.sq_alpha={alpha} must be in [0, 1] (0.5 is the paper's default)"
        bad = [s for s in smooth if s not in SMOOTHABLE]
        if bad or len(set(smooth)) != len(smooth):
            return (f"precision.sq_smooth={smooth}: each entry once, from {', '.join(SMOOTHABLE)} (a linear whose "
                    "input's producer takes the smoothing's 1/s); attn.o is quantized without smoothing")
        if spec is not None and "mlp.down" in smooth and spec.mlp != "gated":
            return ("precision.sq_smooth=[..., mlp.down] needs a gated MLP (act(gate) * up: 1/s folds into up's rows); "
                    f"this model's MLP is act(up) ({spec.activation}), which nothing can fold into: drop mlp.down")
        for key, have in (("per_token", self.per_token), ("per_channel", self.per_channel)):
            if bool(settings[key]) != have:
                return (f"precision.quant={self.name} disagrees with precision.{key}={settings[key]}; use precision=sq "
                        f"with precision.per_token / precision.per_channel")
        return None

    def stored(self, shape, dtype):
        out, inp = shape
        st = {"weight": Stored((out, inp), torch.int8, ("out", "in")),
              "weight_scale": Stored((out,), torch.float32, ("out",)) if self.per_channel
              else Stored((1,), torch.float32, ())}
        if not self.per_token:  # one static scale of the whole input: the same on every rank
            st["act_scale"] = Stored((1,), torch.float32, ())
        return st

    def prepare(self, sources: dict, spec, stats, settings: dict | None):
        """mlp.down first (its 1/s goes into mlp.up's up rows), then attn.qkv / mlp.up over those tensors: the
        up smoothing's column maxima are of the weight the down smoothing left."""
        settings = settings or {}
        alpha, smooth = float(settings.get("sq_alpha", 0.5)), list(settings.get("sq_smooth", DEFAULT_SMOOTH))
        smoothings: dict[str, _Smoothing] = {}
        sources = dict(sources)
        for lin in [x for x in ("mlp.down", "attn.qkv", "mlp.up") if x in smooth]:
            before = dict(sources)  # what this pass reads: the earlier passes' tensors
            for i in range(spec.num_layers):
                linear = f"layers.{i}.{lin}"
                if lin == "mlp.down":  # act(gate) * up: input channel j is up's row j (rows I.. of [gate | up])
                    I = spec.intermediate_size
                    folds = {f"layers.{i}.mlp.up.{t}": slice(I, 2 * I) for t in ("weight", "bias")}
                else:
                    folds = {f"layers.{i}.{NORM_BEFORE[lin]}.{t}": slice(None) for t in ("weight", "bias")}
                sm = smoothings[linear] = _Smoothing(before, stats, linear, folds, alpha)
                for name in [f"{linear}.weight", *folds]:
                    if name in sources:
                        sources[name] = _SmoothedTensor(sm, name, sources[name].shape)
        return sources, _SmoothedStats(stats, smoothings)

    def quantize(self, weight, dtype, stats=None):
        w = weight.float()
        if self.per_channel:
            ws = (w.abs().amax(dim=1) / QMAX).clamp(min=TINY)  # (out,)
        else:
            ws = (w.abs().max() / QMAX).clamp(min=TINY).reshape(1)
        out = {"weight": torch.round(w / ws[:, None] if self.per_channel else w / ws).clamp(-QMAX, QMAX).to(torch.int8),
               "weight_scale": ws}
        if not self.per_token:
            if stats is None or "input_absmax" not in stats:
                raise ValueError("a static activation scale needs calibration statistics (input_absmax)")
            out["act_scale"] = (stats["input_absmax"].float().max() / QMAX).clamp(min=TINY).reshape(1)
        return out

    def linear(self, tensors):
        return W8A8Linear(tensors, self.per_token)


for _per_token in (False, True):
    for _per_channel in (False, True):
        register(SmoothQuant(_per_token, _per_channel))
