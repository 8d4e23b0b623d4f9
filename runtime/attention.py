"""Decode attention kernels, by name: one query token per sequence against the static KV cache.

Every entry computes, for each sequence b and query head h (KV head h // (nh // nkv)),
    softmax(scale * q[b, h] . k[b, kvh, j] + slope[h] * (j - pos[b])) over j = 0..pos[b]
and returns the weighted sum of v[b, kvh, j]. An entry is two functions: `prepare` runs once per
decode step (the mask / bias every layer shares), `attend` once per layer. The cache tensors come as
they are stored (B, nkv, S, hd): in the activation dtype, or int8 / fp8 with the layer's kv_scale =
[s_k, s_v] (runtime/kv_cache.py), where K = s_k * k_cache and V = s_v * v_cache. Every entry takes
every KV-cache format: the torch reference dequantizes the cache, the Triton kernel scales in registers.

"torch" is masked SDPA over the whole cache: the reference, the CPU path, and exactly the
computation the decoder always did (recorded CPU outputs depend on it). "triton" is split-K
flash-decoding (runtime/attention_triton.py): its cost follows each sequence's live length.

Prefill attention kernels (PREFILL_ATTENTION, below) take packed prompts of different lengths, T tokens
in all, in one call per layer: causal attention inside each prompt, none across prompts.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .kv_cache import dequantize

log = logging.getLogger(__name__)

ENV_VAR = "EF_DECODE_ATTENTION"  # auto | torch | triton: a runtime setting, read when a Decoder is made


@dataclass(frozen=True)
class DecodeAttention:
    name: str
    # prepare(pos (B,), seq_len S, alibi_slopes (nh,) | None, dtype) -> state shared by all layers
    prepare: Callable[[torch.Tensor, int, torch.Tensor | None, torch.dtype], Any]
    # attend(q (B, nh, hd), k_cache (B, nkv, S, hd), v_cache, pos (B,), state, scale | None,
    #        kv_scale=(2,) fp32 | None[, rope=(cos, sin) where rotates_q]) -> (B, nh, hd)
    attend: Callable[..., torch.Tensor]
    # supports(device, head_dim) -> why not (a string), or None when it can run
    unsupported: Callable[[torch.device, int], str | None]
    # attend also takes rope=(cos, sin) tables (positions, rotary_dim) fp32 and rotates the unrotated q at pos
    # itself (one kernel a layer fewer); the decoder rotates q for the others (and when $EF_ROPE_IN_ATTENTION=0)
    rotates_q: bool = False
    # attend_writing(q, k, v (B, nkv, hd), kv (2, slots, nkv, S, hd), first, pos, state, scale | None, kv_scale,
    #                kv_format (runtime/kv_cache.py KVFormat)[, rope]) -> (B, nh, hd): attend that first writes
    # this step's k (unrotated where rope is given) and v into the layer's cache at slots first..first+B-1,
    # positions pos, in its format; None: the decoder writes them ($EF_KV_IN_ATTENTION=1 asks for this one)
    attend_writing: Callable[..., torch.Tensor] | None = None


# ---- torch: the reference --------------------------------------------------------------------
def _torch_prepare(pos: torch.Tensor, S: int, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    valid = torch.arange(S, device=pos.device)[None, :] <= pos[:, None]  # (B, S)
    if slopes is None:
        return valid[:, None, None, :]  # (B, 1, 1, S)
    rel = (torch.arange(S, device=pos.device)[None, :] - pos[:, None]).float()  # (B, S)
    bias = slopes[None, :, None] * rel[:, None, :]  # (B, nh, S)
    return bias.masked_fill(~valid[:, None, :], float("-inf"))[:, :, None, :].to(dtype)  # (B, nh, 1, S)


def _torch_attend(q, k_cache, v_cache, pos, mask, scale=None, kv_scale=None):
    if kv_scale is not None:  # a quantized cache: the whole of it dequantized (the reference, not fast)
        k_cache, v_cache = dequantize(k_cache, kv_scale[0], q.dtype), dequantize(v_cache, kv_scale[1], q.dtype)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k_cache, v_cache, attn_mask=mask, scale=scale,
                                       enable_gqa=k_cache.shape[1] != q.shape[1])  # (B, nh, 1, hd)
    return o[:, :, 0]


# ---- triton: split-K flash-decoding ----------------------------------------------------------
def _triton_unsupported(device: torch.device, head_dim: int) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {device} is not CUDA (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU)"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    return None


def _triton_prepare(pos, S, slopes, dtype):
    return slopes


def _triton_attend(q, k_cache, v_cache, pos, slopes, scale=None, kv_scale=None, rope=None):
    from .attention_triton import REDUCE, decode_attention  # imports triton: only when this entry runs

    # (REDUCE an argument of the op, not read inside it: so it is part of the traced graph, and of the compile
    # cache's key, which a switch read inside the op's body would not be)
    return decode_attention(q, k_cache, v_cache, pos, q.shape[-1] ** -0.5 if scale is None else scale, slopes,
                            kv_scale, *(rope or (None, None)), reduce=REDUCE)


def _triton_attend_writing(q, k, v, kv, first, pos, slopes, scale=None, kv_scale=None, kv_format=None, rope=None):
    from .attention_triton import REDUCE, decode_attention_writing

    scaled = kv_format is not None and kv_format.scaled
    qmax, rounds = (kv_format.qmax, kv_format.round) if scaled else (0.0, False)
    return decode_attention_writing(q, k, v, kv, first, pos, q.shape[-1] ** -0.5 if scale is None else scale,
                                    slopes, kv_scale if scaled else None, qmax, rounds, *(rope or (None, None)),
                                    reduce=REDUCE)


DECODE_ATTENTION: dict[str, DecodeAttention] = {
    "torch": DecodeAttention("torch", _torch_prepare, _torch_attend, lambda device, head_dim: None),
    "triton": DecodeAttention("triton", _triton_prepare, _triton_attend, _triton_unsupported, rotates_q=True,
                              attend_writing=_triton_attend_writing),
}
_AUTO_ORDER = {"cuda": ["triton", "torch"]}  # device type -> preference; every other device: torch


# ---- sliced: the torch entry over the live positions only (CPU, eager) --------------------------------
def _sliced_prepare(pos, S, slopes, dtype):
    """(L, mask over 0..L-1): L = the longest live length of the batch, read on the host (free on CPU); no
    mask (None) where every row is at position L - 1 and there is no ALiBi bias.
    Traced for torch.compile the step keeps static shapes: the whole cache, as the torch entry."""
    if torch.compiler.is_compiling():
        return S, _torch_prepare(pos, S, slopes, dtype)
    L = min(int(pos.max()) + 1, S)
    if slopes is None and int(pos.min()) + 1 == L:  # every row sees all L positions (batch 1 always): no mask
        return L, None
    return L, _torch_prepare(pos, L, slopes, dtype)


def _sliced_attend(q, k_cache, v_cache, pos, state, scale=None, kv_scale=None):
    L, mask = state
    extra = {} if kv_scale is None else {"kv_scale": kv_scale}  # a quantized cache: only L positions dequantized
    return _torch_attend(q, k_cache[:, :, :L], v_cache[:, :, :L], pos, mask, scale, **extra)


def _sliced_unsupported(device: torch.device, head_dim: int) -> str | None:
    return None if device.type == "cpu" else f"device {device} is not the CPU (the slice reads pos on the host)"


DECODE_ATTENTION["sliced"] = DecodeAttention("sliced", _sliced_prepare, _sliced_attend, _sliced_unsupported)
_AUTO_ORDER["cpu"] = ["sliced", "torch"]  # a 4,096-token engine decodes short sequences as fast as a tight one


def _select(kind: str, registry: dict, env_var: str, order: dict, reference: str, name: str | None,
            device: torch.device, *needs):
    """`name`, else $env_var, else "auto": the first entry of order[device type] whose unsupported(device,
    *needs) is None, else the reference entry."""
    name = name or os.environ.get(env_var) or "auto"
    if name == "auto":
        for cand in order.get(device.type, [reference]):
            why = registry[cand].unsupported(device, *needs)
            if why is None:
                return registry[cand]
            log.info("%s attention: not %s (%s)", kind, cand, why)
        return registry[reference]
    if name not in registry:
        raise UserError(f"{kind} attention {name!r} (from {env_var} or the caller) is unknown; "
                        f"use auto or one of {', '.join(registry)}")
    why = registry[name].unsupported(device, *needs)
    if why is not None:
        raise UserError(f"{kind} attention {name!r} cannot run here: {why}; use {env_var}=auto or {reference}")
    return registry[name]


def select_decode_attention(device: torch.device, head_dim: int, name: str | None = None) -> DecodeAttention:
    """The entry to use: `name`, else $EF_DECODE_ATTENTION, else "auto" (the first that runs here)."""
    return _select("decode", DECODE_ATTENTION, ENV_VAR, _AUTO_ORDER, "torch", name, device, head_dim)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float | None = None, alibi_slopes: torch.Tensor | None = None,
                     impl: str = "torch", kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One call of entry `impl` (prepare + attend): q (B, nh, hd), caches (B, nkv, S, hd) as stored, pos (B,),
    kv_scale [s_k, s_v] of an int8 / fp8 cache."""
    entry = DECODE_ATTENTION[impl]
    state = entry.prepare(pos, k_cache.shape[2], alibi_slopes, q.dtype)
    return entry.attend(q, k_cache, v_cache, pos, state, scale, kv_scale=kv_scale)


# ---- prefill ---------------------------------------------------------------------------------------
PREFILL_ENV_VAR = "EF_PREFILL_ATTENTION"  # auto | padded | flash_varlen


@dataclass
class Packed:
    """B prompts of different lengths concatenated into T tokens (no padding), as index tensors on the
    device, made once per prefill and read by every layer. Sizes are tensor shapes, never Python ints,
    so that a compiled prefill takes every batch with one compilation."""
    pos: torch.Tensor  # (T,) each token's position in its prompt
    slot: torch.Tensor  # (T,) the KV-cache slot of each token's prompt
    pad: torch.Tensor  # (T,) each token's row in the padded (B * max_len) layout: b * max_len + pos
    gather: torch.Tensor  # (B, max_len) the token at each padded place; T (one past the last) in the padding
    cu: torch.Tensor  # (B + 1,) int32: where each prompt starts, then T
    last: torch.Tensor  # (B,) each prompt's last token
    steps: torch.Tensor  # (max_len,) 0..max_len-1: the longest prompt's positions (an entry that reads no
    #                      (B, max_len) tensor takes max_len from here, and B never specialises it)

    @property
    def max_len(self):
        return self.steps.shape[0]

    def dynamic(self) -> tuple[tuple[torch.Tensor, int], ...]:
        """(tensor, dim) of every size that changes from batch to batch."""
        return ((self.pos, 0), (self.slot, 0), (self.pad, 0), (self.gather, 0), (self.gather, 1), (self.cu, 0),
                (self.steps, 0))


def pack(lengths: list[int], slots: list[int] | None, device: torch.device) -> Packed:
    """The Packed of prompts of `lengths` (each >= 1) that go to cache slots `slots` (default 0..B-1):
    computed on the host, sent in one copy."""
    n = torch.tensor(lengths, dtype=torch.long)
    B, T, L = len(lengths), int(n.sum()), int(n.max())
    seq = torch.repeat_interleave(torch.arange(B), n)  # (T,) each token's prompt
    ends = n.cumsum(0)
    pos = torch.arange(T) - (ends - n)[seq]
    slot = (torch.arange(B) if slots is None else torch.tensor(slots, dtype=torch.long))[seq]
    gather = torch.full((B, L), T)
    gather[seq, pos] = torch.arange(T)
    host = torch.cat([pos, slot, seq * L + pos, torch.cat([ends.new_zeros(1), ends]), ends - 1, torch.arange(L),
                      gather.view(-1)])
    pos, slot, pad, cu, last, steps, gather = host.to(device).split([T, T, T, B + 1, B, L, B * L])
    return Packed(pos, slot, pad, gather.view(B, L), cu.to(torch.int32), last, steps)


@dataclass(frozen=True)
class PrefillAttention:
    name: str
    # attend(q (T, nh, hd), k (T, nkv, hd), v, packed, alibi_slopes (nh,) | None, scale | None) -> (T, nh, hd)
    attend: Callable[..., torch.Tensor]
    # unsupported(device, dtype, head_dim, alibi) -> why not (a string), or None when it can run
    unsupported: Callable[[torch.device, torch.dtype, int, bool], str | None]


def _padded_attend(q, k, v, p: Packed, slopes, scale=None):
    """SDPA over the prompts padded to the longest, (B, n, max_len, hd). Padding goes at the end of each
    prompt, so causal masking alone keeps it from every real query; the padded queries' rows are dropped."""
    (B, L), (nh, hd) = p.gather.shape, q.shape[1:]

    def padded(x):  # (T, n, hd) -> (B, n, L, hd), zeros in the padding
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[p.gather].transpose(1, 2)

    mask = None
    if slopes is not None:  # ALiBi: slope * (j - i), -inf above the diagonal; the same for every prompt
        rel = (p.steps[None, :] - p.steps[:, None]).float()  # (L, L)
        mask = (slopes[:, None, None] * rel[None]).masked_fill(rel[None] > 0, float("-inf")).to(q.dtype)[None]
    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, is_causal=mask is None,
                                       scale=scale, enable_gqa=k.shape[1] != nh)  # (B, nh, L, hd)
    return o.transpose(1, 2).reshape(B * L, nh, hd)[p.pad]


def _flash_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int, alibi: bool) -> str | None:
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not fp16/bf16"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    if alibi:
        return "ALiBi needs a bias, which this entry does not take"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return f"torch {torch.__version__} has no FlashAttention op"
    return None


def _flash_attend(q, k, v, p: Packed, slopes, scale=None):
    """FlashAttention-2 varlen over the packed tokens: what torch.nn.attention.varlen.varlen_attn calls
    (its Python signature changed between torch 2.10 and 2.11; this op's did not). GQA/MQA natively."""
    return torch.ops.aten._flash_attention_forward(q, k, v, p.cu, p.cu, p.max_len, p.max_len, 0.0, True, False,
                                                   scale=scale)[0]


PREFILL_ATTENTION: dict[str, PrefillAttention] = {
    "padded": PrefillAttention("padded", _padded_attend, lambda device, dtype, head_dim, alibi: None),
    "flash_varlen": PrefillAttention("flash_varlen", _flash_attend, _flash_unsupported),
}
_PREFILL_AUTO_ORDER = {"cuda": ["flash_varlen", "padded"]}


def select_prefill_attention(device: torch.device, dtype: torch.dtype, head_dim: int, alibi: bool,
                             name: str | None = None) -> PrefillAttention:
    """The entry to use: `name`, else $EF_PREFILL_ATTENTION, else "auto" (the first that runs here)."""
    return _select("prefill", PREFILL_ATTENTION, PREFILL_ENV_VAR, _PREFILL_AUTO_ORDER, "padded", name, device,
                   dtype, head_dim, alibi)
