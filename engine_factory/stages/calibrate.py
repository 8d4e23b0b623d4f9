"""calibrate: activation statistics for the precisions that need them (an int8 / fp8 KV cache, quant modes
whose `needs_calibration` is set), from the float model on N samples of a calibration set.

The model is the runtime Decoder over the world-1 runtime tensors of the converted checkpoint (fp32 on
CPU, the precision's dtype on CUDA). Samples: the records of calibration.dataset (a JSONL file, a
`datasets` name, or `random` token ids for tokenizer-less / dummy models) in an order shuffled by
calibration.seed, tokenized and concatenated, cut into `samples` windows of `seq_len` tokens: the same
seed gives the same tokens. Hooks record, per layer (statistics names are runtime tensor prefixes):
  stats["layers.{i}.attn.qkv" | ".attn.o" | ".mlp.up" | ".mlp.down"]["input_absmax"]  (in_features,) fp32:
      per-input-channel abs-max at the linear's input (SmoothQuant's activation statistic)
  stats["layers.{i}.attn"]["k_absmax" | "v_absmax"]  (kv_heads, head_dim) fp32: abs-max of K (after
      rotary: what the cache stores) and V per channel; a per-layer KV scale takes their max
Statistics are cached in the store by (converted checkpoint, dataset digest, settings); the engine's hash
takes the statistics' digest and the settings, never the dataset's path.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from runtime.dtypes import DTYPES
from runtime.errors import UserError
from runtime.kv_cache import KV_FORMATS
from runtime.quant import MODES

from ..hashing import digest

log = logging.getLogger(__name__)

NEEDS_CALIBRATION: set[str] = set()  # quant modes that read calibration statistics (or MODES[m].needs_calibration)
CALIBRATE_VERSION = 1
STATS_FILE = "stats.safetensors"
_LINEARS = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")


def needs_calibration(cfg) -> bool:
    kv = KV_FORMATS.get(cfg.precision.kv_cache)
    return (cfg.precision.quant in NEEDS_CALIBRATION or getattr(MODES.get(cfg.precision.quant), "needs_calibration",
                                                                 False) or (kv is not None and kv.scaled))


def _why(cfg) -> str:
    if KV_FORMATS.get(cfg.precision.kv_cache, KV_FORMATS["auto"]).scaled:
        return f"precision.kv_cache={cfg.precision.kv_cache}"
    return f"precision.quant={cfg.precision.quant}"


def check_calibration(cfg) -> None:
    """Before any work: a precision that calibrates has a usable calibration set (one line: setting + fix)."""
    if not needs_calibration(cfg):
        return
    c = cfg.calibration
    if not c.dataset:
        raise UserError(f"{_why(cfg)} needs calibration statistics and calibration.dataset is not set; add "
                        "calibration=cnn_dailymail (64 x 512 tokens of the local cnn_dailymail JSONL), or "
                        "calibration.dataset=<a JSONL file | a datasets name | random>")
    for key in ("samples", "seq_len", "batch_size"):
        if c[key] < 1:
            raise UserError(f"calibration.{key}={c[key]} must be at least 1 for {_why(cfg)}")
    path = Path(str(c.dataset)).expanduser()
    if c.dataset != "random" and (str(c.dataset).endswith((".json", ".jsonl")) or str(c.dataset).startswith(
            ("/", ".", "~"))) and not path.is_file():
        raise UserError(f"calibration.dataset={c.dataset}: no such file; pass a JSONL file with one "
                        f'{{"{c.text_field}": ...}} object a line, a datasets name, or random')


@dataclass
class Calibration:
    stats: dict[str, dict[str, torch.Tensor]]  # stats["layers.3.attn.qkv"]["input_absmax"]
    identity: dict  # what enters the engine's hash: the statistics' digest and the settings

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return self.stats[name]

    def kv_absmax(self, layer: int) -> tuple[float, float]:
        s = self.stats[f"layers.{layer}.attn"]
        return float(s["k_absmax"].max()), float(s["v_absmax"].max())


def _settings(cfg) -> dict:
    c = OmegaConf.to_container(cfg.calibration, resolve=True)
    c.pop("dataset")
    return c


def _dataset_digest(cfg, store) -> str:
    name = str(cfg.calibration.dataset)
    if name == "random":
        return "random"
    path = Path(name).expanduser()
    if path.is_file():
        from runtime.format import DigestCache

        cache = DigestCache(store.root / ".cache" / "digests.json")
        d = cache.sha256(path.resolve())
        cache.save()
        return d
    return digest({"hub": name, "split": cfg.calibration.split, "config": cfg.calibration.config})


def calibration(cfg, source, family, spec, store, tensors=None) -> Calibration | None:
    """The statistics of this build (None when its precision needs none): from the store's cache, else
    computed (converting first unless `tensors` is given) and cached."""
    if not needs_calibration(cfg):
        return None
    from .convert import CONVERT_VERSION, convert

    settings = _settings(cfg)
    data = _dataset_digest(cfg, store)
    key = digest({"converted": {"source": source.digest, "family": family.model_type, "spec": spec.to_dict(),
                                "version": CONVERT_VERSION},
                  "dataset": data, "settings": settings, "version": CALIBRATE_VERSION})
    out = store.cache_dir("calibrate", key)
    if not (out / STATS_FILE).is_file():
        store.prepare("calibration")
        with store.lock(f"calibrate-{key}"):
            if not (out / STATS_FILE).is_file():
                stats = _run(cfg, source, family, spec, tensors if tensors is not None else
                             convert(source, family, spec, store))
                from safetensors.torch import save_file

                with store.staging(out) as tmp:
                    save_file({f"{n}.{k}": t.contiguous() for n, d in sorted(stats.items()) for k, t in d.items()},
                              str(tmp / STATS_FILE))
            else:
                log.info("calibrate: cached %s", out)
    else:
        log.info("calibrate: cached %s (not recomputed)", out)
    raw = (out / STATS_FILE).read_bytes()
    from safetensors.torch import load

    stats: dict[str, dict[str, torch.Tensor]] = {}
    for flat, t in load(raw).items():
        name, stat = flat.rsplit(".", 1)
        stats.setdefault(name, {})[stat] = t
    identity = {"stats": hashlib.sha256(raw).hexdigest(), "dataset": data,
                **{k: settings[k] for k in ("samples", "seq_len", "seed")}}
    return Calibration(stats, identity)


# ---- running the float model ------------------------------------------------------------------------
def _device(cfg) -> torch.device:
    want = cfg.calibration.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _samples(cfg, source, family, spec) -> torch.Tensor:
    """(samples, seq_len) token ids, the same for the same settings and dataset."""
    c = cfg.calibration
    n, L = c.samples, c.seq_len
    g = torch.Generator().manual_seed(c.seed)
    if c.dataset == "random":
        return torch.randint(0, spec.vocab_size, (n, L), generator=g)
    from runtime.summarize import load_articles

    from ..tokenizers import tokenizer_saver

    save = tokenizer_saver(source, family, cfg)
    if save is None:
        raise UserError(f"calibration.dataset={c.dataset} is text, but {source.name} has no tokenizer; pass "
                        "model.tokenizer=<folder>, or calibration.dataset=random (random token ids)")
    rows = load_articles(str(c.dataset), c.split, c.config, (c.text_field, c.text_field), max(4 * n, 256))
    order = torch.randperm(len(rows), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tdir:
        save(Path(tdir))
        from runtime.tokenizer import load_tokenizer

        tok = load_tokenizer(tdir)
    stream: list[int] = []
    for i in order:
        ids = list(tok(rows[i]["article"], add_special_tokens=True)["input_ids"])
        if spec.add_bos_token and spec.bos_token_id is not None and (not ids or ids[0] != spec.bos_token_id):
            ids = [spec.bos_token_id] + ids
        stream += ids
        if len(stream) >= n * L:
            break
    if len(stream) < n * L:
        raise UserError(f"calibration.dataset={c.dataset} has {len(stream)} tokens, fewer than calibration.samples "
                        f"x seq_len = {n} x {L}; lower them or pass a larger dataset")
    return torch.tensor(stream[:n * L]).view(n, L)


def _observe(decoder, stats: dict) -> None:
    """Hooks on a world-1 Decoder: input abs-max of its four linears, K/V abs-max per layer (running max)."""
    def update(name: str, stat: str, value: torch.Tensor) -> None:
        d = stats.setdefault(name, {})
        d[stat] = value.float() if stat not in d else torch.maximum(d[stat], value.float())

    class _Recorded:
        fuses = False  # (runtime/model.py would call a quantized linear's fused form, past __call__ below)

        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def __call__(self, x):
            update(self.name, "input_absmax", x.abs().amax(dim=0))  # (in,) over tokens
            return self.inner(x)

    index = {}
    for i, layer in zip(decoder.layout.layers, decoder.layers):
        index[id(layer)] = i
        for lin in _LINEARS:
            attr = lin.split(".")[1]
            setattr(layer, attr, _Recorded(getattr(layer, attr), f"layers.{i}.{lin}"))
    qkv = decoder._qkv

    def observed_qkv(layer, x, *args, **kw):
        q, k, v = qkv(layer, x, *args, **kw)  # (T, n, hd)
        update(f"layers.{index[id(layer)]}.attn", "k_absmax", k.abs().amax(dim=0))  # (nkv, hd)
        update(f"layers.{index[id(layer)]}.attn", "v_absmax", v.abs().amax(dim=0))
        return q, k, v

    decoder._qkv = observed_qkv


@torch.inference_mode()
def _run(cfg, source, family, spec, tensors) -> dict:
    from runtime.model import Decoder
    from runtime.parallel import RankLayout

    from .build import rank_plan

    t0 = time.perf_counter()
    dev = _device(cfg)
    dtype = torch.float32 if dev.type == "cpu" else DTYPES[cfg.precision.dtype]
    ids = _samples(cfg, source, family, spec)
    layout = RankLayout.of(spec, {"tp": 1, "pp": 1}, 0)
    weights = {n: produce().to(dev) for n, (_, _, produce) in rank_plan(tensors, spec, dtype, layout).items()}
    decoder = Decoder(spec, weights)
    stats: dict = {}
    _observe(decoder, stats)
    bs = cfg.calibration.batch_size
    for start in tqdm(range(0, len(ids), bs), desc="calibrate", unit="batch", leave=False):
        batch = ids[start:start + bs]
        decoder.prefill(batch.reshape(-1).to(dev), [batch.shape[1]] * batch.shape[0])
    log.info("calibrate: %d samples x %d tokens of %s on %s (%s) in %.1fs", ids.shape[0], ids.shape[1],
             cfg.calibration.dataset, dev, str(dtype).replace("torch.", ""), time.perf_counter() - t0)
    return {n: {k: t.cpu() for k, t in d.items()} for n, d in stats.items()}
