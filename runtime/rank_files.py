"""What each rank file of an engine must hold, and the check of a rank file's header against it.

The world-1 runtime tensors follow from the spec (fused attn.qkv = [q | k | v], mlp.up = [gate | up]);
a quant mode (runtime/quant) says what it stores for each of a layer's four linears; the shard plan
(runtime/shard.py) and the rank's layout (runtime/parallel.py) say which of those tensors the rank holds
and its part of each. A rank file whose names, shapes or dtypes differ from that (a rewritten engine.json,
a rank file of another build) is refused in one line naming the file and the tensor, before any weight
is read: the decoder would otherwise fail deep inside a layer, or compute garbage.

Only the safetensors header is read (8 bytes of length, then JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .dtypes import SAFETENSORS_DTYPES as _SAFETENSORS_DTYPES
from .errors import EngineError
from .parallel import RankLayout
from .shard import rank_tensor_names, shard_shape, style_of
from .spec import ModelSpec

_QUANTIZED_STYLES = ("column_qkv", "column_up", "row")  # the four linears of a layer: stored as a quant mode's
_MAX_HEADER = 100 << 20  # safetensors' own limit
_REBUILD = "rebuild the engine"


def quantized_weight(name: str, lm_head: bool = False) -> bool:
    """Whether a quant mode stores this world-1 runtime tensor as its own tensors (runtime/quant Stored): the
    weights of a layer's four linears, and the lm_head's where the engine quantizes it too (engine.json
    quant.lm_head, the build's precision.quant_lm_head)."""
    return name.endswith(".weight") and (style_of(name) in _QUANTIZED_STYLES or (lm_head and name == "lm_head.weight"))


def world_shapes(spec: ModelSpec, fused: bool = True) -> dict[str, tuple[int, ...]]:
    """Every float tensor of the world-1 engine in runtime names, (out, in) for linears. fused=False: the
    converted checkpoint's tensors instead (q/k/v and gate/up apart: engine_factory/layout.py)."""
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    if spec.position == "learned":
        out["pos_embed.weight"] = (spec.max_position_embeddings, H)

    def norm(name):
        out[f"{name}.weight"] = (H,)
        if spec.norm_bias:
            out[f"{name}.bias"] = (H,)

    def linear(name, o, i, bias):
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    if spec.embedding_norm:
        norm("embed_norm")
    for i in range(spec.num_layers):
        p = f"layers.{i}"
        norm(f"{p}.attn_norm")
        if fused:
            linear(f"{p}.attn.qkv", spec.q_size + 2 * spec.kv_size, H, spec.qkv_bias)
        else:
            for part, size in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size)):
                linear(f"{p}.attn.{part}", size, H, spec.qkv_bias)
        linear(f"{p}.attn.o", H, spec.q_size, spec.o_bias)
        norm(f"{p}.mlp_norm")
        if fused:
            linear(f"{p}.mlp.up", (2 if spec.mlp == "gated" else 1) * I, H, spec.mlp_bias)
        else:
            for part in ("gate", "up") if spec.mlp == "gated" else ("up",):
                linear(f"{p}.mlp.{part}", I, H, spec.mlp_bias)
        linear(f"{p}.mlp.down", H, I, spec.mlp_bias)
    norm("final_norm")
    if not spec.tie_word_embeddings:
        linear("lm_head", V, H, spec.lm_head_bias)
    return out


def expected_tensors(spec: ModelSpec, mapping: dict, quant: str, dtype: torch.dtype, rank: int, kv_cache: str = "auto",
                     lm_head: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of what rank `rank` of the engine stores (the build's rank plan, over shapes);
    lm_head: the engine's lm_head is quantized too (engine.json quant.lm_head)."""
    from .quant import get as quant_mode  # the quant modes: what a linear's weight is stored as

    mode = quant_mode(quant)
    layout = RankLayout.of(spec, mapping, rank)
    stored: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[str, ...] | None]] = {}
    for name, shape in world_shapes(spec).items():
        if mode.quantizes and quantized_weight(name, lm_head):
            for suffix, st in mode.stored(shape, dtype).items():
                stored[name[:-len("weight")] + suffix] = (tuple(st.shape), st.dtype, tuple(st.follows))
        else:
            stored[name] = (shape, dtype, None)
    names = rank_tensor_names(layout, list(stored))
    if "lm_head.weight" in names and "lm_head.weight" not in stored:  # a tied model's own copy of the embedding
        stored["lm_head.weight"] = (stored["embed.weight"][0], dtype, None)
    out = {n: (shard_shape(n, stored[n][0], layout, stored[n][2]), stored[n][1]) for n in names}
    from .kv_cache import SCALE_NAME, kv_format

    if kv_format(kv_cache).scaled:  # [s_k, s_v] of each of the rank's layers (runtime/kv_cache.py)
        out.update({SCALE_NAME.format(i=i): ((2,), torch.float32) for i in layout.layers})
    return out


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) from a rank file's header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(entry.get("dtype"), str)):
                raise ValueError(f"entry {name!r} lacks a shape or dtype")
            out[name] = (tuple(shape), entry["dtype"])
        return out
    except OSError as e:
        raise EngineError(f"{path}: cannot be read ({e.strerror}); {_REBUILD}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EngineError(f"{path}: not a readable rank file ({str(e)[:100]}); {_REBUILD}") from None


def _show(shape, dtype) -> str:
    dt = dtype if isinstance(dtype, str) else _SAFETENSORS_DTYPES.get(dtype, str(dtype))
    return f"{list(shape)} {dt}"


def check_rank_file(path: Path, config: dict, rank: int) -> None:
    """One EngineError line unless the rank file at path holds exactly what engine.json's spec, mapping, quant
    mode and dtype say rank `rank` holds (names, shapes, dtypes)."""
    from .dtypes import DTYPES

    spec = ModelSpec.from_dict(config["spec"])
    dtype = getattr(torch, str(config["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
        raise EngineError(f"{path.parent / 'engine.json'}: dtype={config['dtype']!r} is not one of "
                          f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES.values())}; {_REBUILD}")
    mapping = config["mapping"]
    q = config["quant"]
    want = expected_tensors(spec, mapping, q["mode"], dtype, rank, q.get("kv_cache", "auto"), q.get("lm_head", False))
    have = read_header(path)
    who = f"rank {rank} of tp={mapping['tp']} pp={mapping['pp']}"
    for name, (shape, dt) in want.items():
        if name not in have:
            raise EngineError(f"{path}: lacks tensor {name} ({_show(shape, dt)}), which engine.json's spec and "
                              f"mapping give {who}; {_REBUILD}")
        found = have[name]
        if found != (shape, _SAFETENSORS_DTYPES.get(dt, str(dt))):
            raise EngineError(f"{path}: tensor {name} is {_show(*found)} but engine.json's spec and mapping give "
                              f"{who} {_show(shape, dt)}; {_REBUILD}")
    from .kv_cache import SCALE_NAME  # a quantized KV cache's per-layer scales: (2,) float32, checked by the Decoder

    kv = {SCALE_NAME.format(i=i) for i in RankLayout.of(spec, mapping, rank).layers}
    for name in kv & set(have):
        if have[name] != ((2,), "F32"):
            raise EngineError(f"{path}: tensor {name} is {_show(*have[name])} but a KV-cache scale is [2] F32; "
                              f"{_REBUILD}")
    extra = sorted(set(have) - set(want) - kv)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise EngineError(f"{path}: holds tensor {extra[0]} ({_show(*have[extra[0]])}){more}, which is not "
                          f"a tensor of {who} by engine.json's spec and mapping; {_REBUILD}")
