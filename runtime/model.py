"""The one decoder. Every family is this code with the flags of a ModelSpec.

Tensors are addressed by the runtime layout of a rank file (see engine_factory/stages/build.py):
embed, pos_embed, embed_norm, layers.{i}.{attn_norm, attn.qkv, attn.o, mlp_norm, mlp.up, mlp.down},
final_norm, lm_head. The KV cache is static and preallocated: decode() has fixed shapes for a given
batch size, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .linear import make_linear
from .spec import ModelSpec

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), with the interleaved extension for non-powers of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


class _Norm:
    def __init__(self, spec: ModelSpec, tensors: dict, prefix: str):
        self.kind, self.eps = spec.norm, spec.norm_eps
        self.weight = tensors[f"{prefix}.weight"]
        self.bias = tensors.get(f"{prefix}.bias")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 as HF does for RMSNorm; cast back to the activation dtype.
        xf = x.float()
        if self.kind == "rms":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * y.to(x.dtype)
        y = F.layer_norm(xf, (xf.shape[-1],), self.weight.float(),
                         None if self.bias is None else self.bias.float(), self.eps)
        return y.to(x.dtype)


class _Layer:
    def __init__(self, spec: ModelSpec, tensors: dict, i: int, quant: str):
        p = f"layers.{i}"
        self.attn_norm = _Norm(spec, tensors, f"{p}.attn_norm")
        self.mlp_norm = _Norm(spec, tensors, f"{p}.mlp_norm")
        self.qkv = make_linear(quant, tensors, f"{p}.attn.qkv")
        self.o = make_linear(quant, tensors, f"{p}.attn.o")
        self.up = make_linear(quant, tensors, f"{p}.mlp.up")
        self.down = make_linear(quant, tensors, f"{p}.mlp.down")


class Decoder:
    """Weights of one rank + a static KV cache; prefill() for packed prompts, decode() per token."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], quant: str = "none",
                 tp_size: int = 1):
        self.spec = spec
        self.n_heads = spec.num_heads // tp_size
        self.n_kv = spec.num_kv_heads // tp_size
        self.hd = spec.head_dim
        self.act = _ACTIVATIONS[spec.activation]
        self.embed = tensors["embed.weight"]  # (V, H)
        self.pos_embed = tensors.get("pos_embed.weight")  # (P, H) for learned positions
        self.embed_norm = _Norm(spec, tensors, "embed_norm") if spec.embedding_norm else None
        self.layers = [_Layer(spec, tensors, i, quant) for i in range(spec.num_layers)]
        self.final_norm = _Norm(spec, tensors, "final_norm")
        self.lm_head = tensors["embed.weight"] if spec.tie_word_embeddings else tensors["lm_head.weight"]
        self.lm_head_bias = tensors.get("lm_head.bias")
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self._rope = self._rope_tables() if spec.position == "rope" else None
        self.slopes = alibi_slopes(spec.num_heads).to(self.device) if spec.position == "alibi" else None
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    # ---- tables and cache -------------------------------------------------------------------
    def _rope_tables(self):
        rd, n = self.spec.rotary_dim, self.spec.max_position_embeddings
        inv = 1.0 / (self.spec.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (P, rd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # HF half-split rotary order
        return emb.cos().to(self.device), emb.sin().to(self.device)

    def allocate_cache(self, batch: int, seq_len: int, dtype: torch.dtype | None = None) -> None:
        shape = (batch, self.n_kv, seq_len, self.hd)  # (B, nkv, S, hd)
        dt = dtype or self.dtype
        self.k_cache = [torch.zeros(shape, dtype=dt, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dt, device=self.device) for _ in self.layers]

    @property
    def cache_shape(self) -> tuple[int, int]:
        return (self.k_cache[0].shape[0], self.k_cache[0].shape[2]) if self.k_cache else (0, 0)

    # ---- pieces -------------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x: (T, n, hd), pos: (T,)
        cos, sin = self._rope
        cos, sin = cos[pos][:, None, :].to(x.dtype), sin[pos][:, None, :].to(x.dtype)
        rd = self.spec.rotary_dim
        xr, xp = x[..., :rd], x[..., rd:]
        half = rd // 2
        rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return torch.cat([xr * cos + rot * sin, xp], dim=-1)

    def _embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed[tokens]  # (T, H)
        if self.pos_embed is not None:
            h = h + self.pos_embed[pos]
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        return h

    def _qkv(self, layer: _Layer, x: torch.Tensor, pos: torch.Tensor):
        T = x.shape[0]
        qkv = layer.qkv(layer.attn_norm(x))  # (T, (nh + 2 nkv) hd)
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(T, self.n_heads, self.hd)
        k = k.view(T, self.n_kv, self.hd)
        v = v.view(T, self.n_kv, self.hd)
        if self._rope is not None:
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        return q, k, v

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = layer.up(layer.mlp_norm(x))
        if self.spec.mlp == "gated":
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return layer.down(h)

    def _alibi_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # (nh, Tq, Tk): slope * (j - i); the causal/validity mask is added by the caller
        rel = (k_pos[None, :] - q_pos[:, None]).float()
        return self.slopes[:, None, None] * rel[None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        logits = F.linear(h, self.lm_head, self.lm_head_bias)
        return logits.float()

    # ---- forward passes ---------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, lengths: list[int], slots: list[int] | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Packed prompts (no padding): tokens (T,) = concatenation of sequences of `lengths`.

        Writes K/V of sequence b at cache slot slots[b], positions 0..len-1. Returns the logits of
        every token (T, V) when all_logits, else of each sequence's last token (B, V).
        """
        slots = list(range(len(lengths))) if slots is None else slots
        pos = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        h = self._embed(tokens, pos)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, pos)
            outs = []
            for b, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
                n = e - s
                if self.k_cache:
                    self.k_cache[li][slots[b], :, :n] = k[s:e].transpose(0, 1)
                    self.v_cache[li][slots[b], :, :n] = v[s:e].transpose(0, 1)
                qb = q[s:e].transpose(0, 1)[None]  # (1, nh, n, hd)
                kb = k[s:e].transpose(0, 1)[None]  # (1, nkv, n, hd)
                vb = v[s:e].transpose(0, 1)[None]
                if self.slopes is None:
                    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                       enable_gqa=self.n_kv != self.n_heads)
                else:
                    p = pos[s:e]
                    causal = p[None, :] <= p[:, None]
                    bias = self._alibi_bias(p, p).masked_fill(~causal, float("-inf"))
                    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias[None].to(qb.dtype),
                                                       enable_gqa=self.n_kv != self.n_heads)
                outs.append(o[0].transpose(0, 1).reshape(n, -1))
            h = h + layer.o(torch.cat(outs, dim=0))
            h = h + self._mlp(layer, h)
        if not all_logits:
            h = h[torch.tensor(starts[1:], device=self.device) - 1]
        return self._logits(h)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per cache slot 0..B-1: tokens (B,), pos (B,) its position. Returns (B, V).

        Static shapes and no host synchronisation: safe to capture in a CUDA graph.
        """
        B = tokens.shape[0]
        S = self.k_cache[0].shape[2]
        h = self._embed(tokens, pos)  # (B, H)
        bidx = torch.arange(B, device=self.device)
        valid = torch.arange(S, device=self.device)[None, :] <= pos[:, None]  # (B, S)
        if self.slopes is None:
            mask = valid[:, None, None, :]  # (B, 1, 1, S)
        else:
            rel = (torch.arange(S, device=self.device)[None, :] - pos[:, None]).float()  # (B, S)
            bias = self.slopes[None, :, None] * rel[:, None, :]  # (B, nh, S)
            mask = bias.masked_fill(~valid[:, None, :], float("-inf"))[:, :, None, :].to(h.dtype)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, pos)  # (B, n, hd)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[bidx, :, pos] = k.to(kc.dtype)
            vc[bidx, :, pos] = v.to(vc.dtype)
            o = F.scaled_dot_product_attention(q[:, :, None, :], kc[:B], vc[:B], attn_mask=mask,
                                               enable_gqa=self.n_kv != self.n_heads)  # (B, nh, 1, hd)
            h = h + layer.o(o.reshape(B, -1))
            h = h + self._mlp(layer, h)
        return self._logits(h)
