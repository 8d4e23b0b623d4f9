"""Decode attention kernels, by name: one query token per sequence against the static KV cache.

Every entry computes, for each sequence b and query head h (KV head h // (nh // nkv)),
    softmax(scale * q[b, h] . k[b, kvh, j] + slope[h] * (j - pos[b])) over j = 0..pos[b]
and returns the weighted sum of v[b, kvh, j]. An entry is two functions: `prepare` runs once per
decode step (the mask / bias every layer shares), `attend` once per layer. The cache tensors come as
they are stored (B, nkv, S, hd); a quantized KV format is a new entry that also takes its scales.

"torch" is masked SDPA over the whole cache: the reference, the CPU path, and exactly the
computation the decoder always did (recorded CPU outputs depend on it). "triton" is split-K
flash-decoding (runtime/attention_triton.py): its cost follows each sequence's live length.
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

log = logging.getLogger(__name__)

ENV_VAR = "EF_DECODE_ATTENTION"  # auto | torch | triton: a runtime setting, read when a Decoder is made


@dataclass(frozen=True)
class DecodeAttention:
    name: str
    # prepare(pos (B,), seq_len S, alibi_slopes (nh,) | None, dtype) -> state shared by all layers
    prepare: Callable[[torch.Tensor, int, torch.Tensor | None, torch.dtype], Any]
    # attend(q (B, nh, hd), k_cache (B, nkv, S, hd), v_cache, pos (B,), state, scale | None) -> (B, nh, hd)
    attend: Callable[..., torch.Tensor]
    # supports(device, head_dim) -> why not (a string), or None when it can run
    unsupported: Callable[[torch.device, int], str | None]


# ---- torch: the reference --------------------------------------------------------------------
def _torch_prepare(pos: torch.Tensor, S: int, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    valid = torch.arange(S, device=pos.device)[None, :] <= pos[:, None]  # (B, S)
    if slopes is None:
        return valid[:, None, None, :]  # (B, 1, 1, S)
    rel = (torch.arange(S, device=pos.device)[None, :] - pos[:, None]).float()  # (B, S)
    bias = slopes[None, :, None] * rel[:, None, :]  # (B, nh, S)
    return bias.masked_fill(~valid[:, None, :], float("-inf"))[:, :, None, :].to(dtype)  # (B, nh, 1, S)


def _torch_attend(q, k_cache, v_cache, pos, mask, scale=None):
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


def _triton_attend(q, k_cache, v_cache, pos, slopes, scale=None):
    from .attention_triton import decode_attention  # imports triton: only when this entry runs

    return decode_attention(q, k_cache, v_cache, pos, q.shape[-1] ** -0.5 if scale is None else scale, slopes)


DECODE_ATTENTION: dict[str, DecodeAttention] = {
    "torch": DecodeAttention("torch", _torch_prepare, _torch_attend, lambda device, head_dim: None),
    "triton": DecodeAttention("triton", _triton_prepare, _triton_attend, _triton_unsupported),
}
_AUTO_ORDER = {"cuda": ["triton", "torch"]}  # device type -> preference; every other device: torch


def select_decode_attention(device: torch.device, head_dim: int, name: str | None = None) -> DecodeAttention:
    """The entry to use: `name`, else $EF_DECODE_ATTENTION, else "auto" (the first that runs here)."""
    name = name or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ["torch"]):
            why = DECODE_ATTENTION[cand].unsupported(device, head_dim)
            if why is None:
                return DECODE_ATTENTION[cand]
            log.info("decode attention: not %s (%s)", cand, why)
        return DECODE_ATTENTION["torch"]
    if name not in DECODE_ATTENTION:
        raise UserError(f"decode attention {name!r} (from {ENV_VAR} or the caller) is unknown; "
                        f"use auto or one of {', '.join(DECODE_ATTENTION)}")
    why = DECODE_ATTENTION[name].unsupported(device, head_dim)
    if why is not None:
        raise UserError(f"decode attention {name!r} cannot run here: {why}; use {ENV_VAR}=auto or torch")
    return DECODE_ATTENTION[name]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float | None = None, alibi_slopes: torch.Tensor | None = None,
                     impl: str = "torch") -> torch.Tensor:
    """One call of entry `impl` (prepare + attend): q (B, nh, hd), caches (B, nkv, S, hd), pos (B,)."""
    entry = DECODE_ATTENTION[impl]
    state = entry.prepare(pos, k_cache.shape[2], alibi_slopes, q.dtype)
    return entry.attend(q, k_cache, v_cache, pos, state, scale)
