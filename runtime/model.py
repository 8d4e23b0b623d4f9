"""The one decoder. Every family is this code with the flags of a ModelSpec.

Tensors are addressed by the runtime layout of a rank file (see engine_factory/stages/build.py):
embed, pos_embed, embed_norm, layers.{i}.{attn_norm, attn.qkv, attn.o, mlp_norm, mlp.up, mlp.down},
final_norm, lm_head. The KV cache is static and preallocated: decode() has fixed shapes for a given
batch size, so it can be captured in a CUDA graph.

One rank of a multi-rank engine is this code with a RankLayout (runtime/parallel.py) and a Comm: its
heads, KV heads, ALiBi slopes and layers; an all-reduce after the row-parallel attn.o and mlp.down; the
embedding gathered (hidden split) or summed (vocab split); the vocab-split logits gathered; activations
sent from stage to stage in micro-batches (GPipe: stage s runs micro-batch m while stage s+1 runs m-1).
Every rank is called with the same arguments and returns the same logits.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import Packed, pack, select_decode_attention, select_prefill_attention
from .kv_cache import SCALE_NAME, kv_format
from .parallel import Comm, RankLayout, micro_batch_groups, micro_batches_setting
from .quant import make_linear
from .quant.dense import cpu_gemv_layout
from .spec import ModelSpec

log = logging.getLogger(__name__)

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


def _fuses(linear) -> bool:
    """Whether linear may fold the pointwise work around it into its kernel (decode at batch 1, $EF_WO_FUSE=1:
    runtime/quant/__init__.py's GemvFusions); its fused() then says for which x (None: run the plain ops)."""
    return getattr(linear, "fuses", False)


def _normed(linear, norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)): the RMSNorm inside the linear's kernel where it has one for x (_fuses), else the two."""
    y = linear.fused(x, norm=norm.weight, eps=norm.eps) if _fuses(linear) and norm.kind == "rms" \
        and norm.bias is None else None
    return y if y is not None else linear(norm(x))


def _plus(h: torch.Tensor, linear, x: torch.Tensor) -> torch.Tensor:
    """h + linear(x), the add in the linear's kernel where it has one for x (_fuses)."""
    y = linear.fused(x, residual=h) if _fuses(linear) else None
    return y if y is not None else h + linear(x)


class _RowParallel:
    """A linear whose input features are split across the tp ranks: partial products summed by the
    all-reduce, then the (whole) bias added once."""

    def __init__(self, quant: str, tensors: dict, prefix: str, comm: Comm):
        bias = f"{prefix}.bias"
        self.linear = make_linear(quant, {k: v for k, v in tensors.items() if k.startswith(prefix + ".")
                                          and k != bias}, prefix)
        self.bias, self.comm = tensors.get(bias), comm
        if hasattr(self.linear, "row_max"):  # its per-token input scale is over the whole row (runtime/quant/sq.py)
            self.linear.row_max = comm.all_reduce_max

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(self.linear(x))
        return y if self.bias is None else y + self.bias


class _Layer:
    def __init__(self, spec: ModelSpec, tensors: dict, i: int, quant: str, comm: Comm):
        p = f"layers.{i}"
        row = (lambda prefix: _RowParallel(quant, tensors, prefix, comm)) if comm.tp > 1 else \
            (lambda prefix: make_linear(quant, tensors, prefix))
        self.attn_norm = _Norm(spec, tensors, f"{p}.attn_norm")
        self.mlp_norm = _Norm(spec, tensors, f"{p}.mlp_norm")
        self.qkv = make_linear(quant, tensors, f"{p}.attn.qkv")
        self.o = row(f"{p}.attn.o")
        self.up = make_linear(quant, tensors, f"{p}.mlp.up")
        self.down = row(f"{p}.mlp.down")
        self.kv_scale = tensors.get(SCALE_NAME.format(i=i))  # (2,) K and V scales of a quantized KV cache
        self.k_scale, self.v_scale = (None, None) if self.kv_scale is None else self.kv_scale.unbind()


@dataclass
class _Micro:
    """One micro-batch of a pipelined pass: the tokens the first stage embeds (their rows pass from stage
    to stage), this stage's layers over those rows, and the rows whose logits the last stage returns."""
    tokens: torch.Tensor  # (n,)
    pos: torch.Tensor  # (n,)
    layers: Callable[[torch.Tensor], torch.Tensor]  # (n, H) -> (n, H)
    pick: torch.Tensor | None  # rows of the logits, None: all n
    out_rows: int


class Decoder:
    """Weights of one rank + a static KV cache; prefill() for packed prompts, decode() per token.

    layout/comm None: world 1 (the whole model in this process). quant_lm_head: the lm_head is stored as the
    quant mode's tensors too (precision.quant_lm_head), else in the float dtype."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], quant: str = "none",
                 layout: RankLayout | None = None, comm: Comm | None = None, kv_cache: str = "auto",
                 quant_lm_head: bool = False):
        self.spec = spec
        self.kv = kv_format(kv_cache)  # runtime/kv_cache.py: what the cache stores
        L = self.layout = layout or RankLayout.of(spec, {"tp": 1, "pp": 1}, 0)
        self.comm = comm or Comm.single()
        if (self.comm.tp, self.comm.pp, self.comm.rank) != (L.tp, L.pp, L.rank):
            raise ValueError(f"comm is rank {self.comm.rank} of tp={self.comm.tp} pp={self.comm.pp} but the "
                             f"layout is rank {L.rank} of tp={L.tp} pp={L.pp}")
        self.n_heads, self.n_kv = len(L.heads), len(L.kv_heads)
        self.hd = spec.head_dim
        self.act = _ACTIVATIONS[spec.activation]
        self.embedding_split = L.embedding_sharding if L.tp > 1 else "none"
        self.embed = tensors["embed.weight"] if L.first_stage else None  # (V, H), or this rank's part
        self.pos_embed = tensors.get("pos_embed.weight")  # (P, H) for learned positions
        self.embed_norm = _Norm(spec, tensors, "embed_norm") if spec.embedding_norm and L.first_stage else None
        self.layers = [_Layer(spec, tensors, i, quant, self.comm) for i in L.layers]
        if self.kv.scaled and any(layer.kv_scale is None for layer in self.layers):
            raise ValueError(f"KV cache {kv_cache} needs {SCALE_NAME} for every layer; the tensors lack some")
        self.final_norm = self.lm_head = self.lm_head_bias = self.quant_head = None
        if L.last_stage:
            self.final_norm = _Norm(spec, tensors, "final_norm")
            if quant_lm_head:  # the quant mode's linear (engine.json quant.lm_head; it adds lm_head.bias itself)
                self.quant_head = make_linear(quant, tensors, "lm_head")
            else:  # (V / tp, H); fp32 on CPU with its columns contiguous, as the dense linears (quant/dense.py)
                self.lm_head = cpu_gemv_layout(tensors["embed.weight" if L.head_uses_embed else "lm_head.weight"])
                self.lm_head_bias = tensors.get("lm_head.bias")
        first = tensors["embed.weight"] if L.first_stage else tensors[f"layers.{L.layers.start}.attn_norm.weight"]
        self.device, self.dtype = first.device, first.dtype
        self._rope = self._rope_tables() if spec.position == "rope" else None
        self.slopes = L.alibi_slopes().to(self.device) if spec.position == "alibi" else None
        self.decode_attention = select_decode_attention(self.device, self.hd)  # $EF_DECODE_ATTENTION, else auto
        # decode rotates q inside attention where the entry can ($EF_ROPE_IN_ATTENTION=0: in the decoder, as prefill)
        self.rope_in_attention = os.environ.get("EF_ROPE_IN_ATTENTION") != "0"
        # decode writes k (and k's rotary, with q's) and v into the cache inside attention where the entry can
        # ($EF_KV_IN_ATTENTION=1; off: one compiled write kernel a layer, as prefill)
        self.kv_in_attention = (os.environ.get("EF_KV_IN_ATTENTION") == "1"
                                and self.decode_attention.attend_writing is not None)
        # a gated MLP's gate and up as two products instead of one over the stored [gate; up] rows, where the
        # linear can ($EF_SPLIT_GATE_UP=1, for A/B runs: gpt-fast's two 11,008-row GEMVs against our one of 22,016
        # rows, which cuBLAS ran at 2.65 TB/s on an H100 on 2026-12-07)
        self.split_gate_up = os.environ.get("EF_SPLIT_GATE_UP") == "1" and spec.mlp == "gated"
        if self.split_gate_up and not all(hasattr(layer.up, "row_blocks") for layer in self.layers):
            log.warning("EF_SPLIT_GATE_UP=1 does nothing here: only dense (fp32/fp16/bf16) linears split; this "
                        "engine's are %s", type(self.layers[0].up).__name__)
            self.split_gate_up = False
        self.prefill_attention = select_prefill_attention(self.device, self.dtype, self.hd,  # $EF_PREFILL_ATTENTION
                                                          self.slopes is not None)
        self.prefill_layers = self._prefill_layers  # compile_prefill() puts the compiled one here
        # micro-batches of a pipelined (pp > 1) prefill or decode: $EF_MICRO_BATCHES, else None = pp; at most
        # one per sequence (prefill) or row (decode). Every rank of the engine must hold the same number.
        self.micro_batches = micro_batches_setting()
        self.kv_cache: list[torch.Tensor] = []  # allocate_cache: (2, B, nkv, S, hd) a layer

    # ---- tables and cache -------------------------------------------------------------------
    def _rope_tables(self):
        rd, n = self.spec.rotary_dim, self.spec.max_position_embeddings
        inv = 1.0 / (self.spec.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (P, rd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # HF half-split rotary order
        return emb.cos().to(self.device), emb.sin().to(self.device)

    def allocate_cache(self, batch: int, seq_len: int, dtype: torch.dtype | None = None) -> None:
        # a layer's K and V (B, nkv, S, hd) in one tensor, so that one indexed write stores both
        shape = (2, batch, self.n_kv, seq_len, self.hd)
        dt = self.kv.storage_dtype(dtype or self.dtype)
        self.kv_cache = [torch.zeros(shape, dtype=dt, device=self.device) for _ in self.layers]

    # K and V as views of kv_cache made at each use, never kept: a compiled step that writes kv_cache[i] and reads
    # a view made before (outside the graph) copies the whole cache a layer (H100, 2026-12-07: 22.9 ms a decode
    # step at batch 1 instead of ~5; tests/test_prefill.py::test_compiled_steps_write_the_cache_in_place looks
    # for such copies in Inductor's code)
    @property
    def k_cache(self) -> list[torch.Tensor]:
        return [kv[0] for kv in self.kv_cache]

    @property
    def v_cache(self) -> list[torch.Tensor]:
        return [kv[1] for kv in self.kv_cache]

    @property
    def cache_shape(self) -> tuple[int, int]:
        return (self.kv_cache[0].shape[1], self.kv_cache[0].shape[3]) if self.kv_cache else (0, 0)

    # ---- pieces -------------------------------------------------------------------------------
    def _rope_at(self, pos: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) (T, 1, rotary_dim) in dtype at positions pos (T,), once per forward for every layer;
        None without rotary."""
        if self._rope is None:
            return None
        cos, sin = self._rope
        return cos[pos][:, None, :].to(dtype), sin[pos][:, None, :].to(dtype)

    def _rotate(self, x: torch.Tensor, rope) -> torch.Tensor:
        # x: (T, n, hd); rope: _rope_at's (cos, sin)
        cos, sin = rope
        rd = self.spec.rotary_dim
        xr = x[..., :rd] if rd < x.shape[-1] else x
        half = rd // 2
        rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        y = xr * cos + rot * sin
        return y if rd == x.shape[-1] else torch.cat([y, x[..., rd:]], dim=-1)

    def _embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.embedding_split == "vocab":  # rows [start, start + n) here: look up those, sum over ranks
            n, start = self.embed.shape[0], self.layout.vocab.start
            local = tokens - start
            here = (local >= 0) & (local < n)
            h = self.comm.all_reduce(self.embed[local.clamp(0, n - 1)].masked_fill(~here[:, None], 0))
        elif self.embedding_split == "hidden":  # (T, H / tp) here
            h = self.comm.all_gather(self.embed[tokens], dim=-1)
        else:
            h = self.embed[tokens]  # (T, H)
        if self.pos_embed is not None:
            h = h + self.pos_embed[pos]
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        return h

    def _qkv(self, layer: _Layer, x: torch.Tensor, rope, rotate_q: bool = True, rotate_k: bool = True):
        """q, k, v (T, n, hd) of x; rotary applied to q and k unless rotate_q / rotate_k is False (decode
        attention that rotates them itself)."""
        T = x.shape[0]
        qkv = _normed(layer.qkv, layer.attn_norm, x)  # (T, (nh + 2 nkv) hd)
        qk, v = qkv.split([(self.n_heads + self.n_kv) * self.hd, self.n_kv * self.hd], dim=-1)
        qk = qk.view(T, self.n_heads + self.n_kv, self.hd)
        if rope is not None and rotate_q and rotate_k:  # q's and k's heads in one go (the same per-head arithmetic)
            qk = self._rotate(qk, rope)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        if rope is not None and rotate_q != rotate_k:
            q, k = (self._rotate(q, rope), k) if rotate_q else (q, self._rotate(k, rope))
        return q, k, v.view(T, self.n_kv, self.hd)

    def _write_kv(self, li: int, layer: _Layer, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> None:
        """k, v (T, nkv, hd) of tokens at (slots, pos) (T,) into layer li's cache, in its format: one indexed
        write of both (compiled: one kernel with k's rotary and the quantization, not one a tensor)."""
        kv = self.kv_cache[li]  # (2, Bmax, nkv, S, hd); indexed [:, slots, :, pos]: (T, 2, nkv, hd)
        kv[:, slots, :, pos] = torch.stack([self.kv.quantize(k, layer.k_scale, kv.dtype),
                                            self.kv.quantize(v, layer.v_scale, kv.dtype)], dim=1)

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        """h + the MLP of h (the norm, activation and add inside the linears' kernels where they can: _normed)."""
        if self.spec.mlp != "gated":
            return _plus(h, layer.down, self.act(_normed(layer.up, layer.mlp_norm, h)))
        if self.split_gate_up:
            gate, up = layer.up.row_blocks(layer.mlp_norm(h), 2)
            return h + layer.down(self.act(gate) * up)
        gate_up = _normed(layer.up, layer.mlp_norm, h)
        y = layer.down.fused(gate_up, act=self.spec.activation, residual=h) if _fuses(layer.down) else None
        if y is not None:
            return y
        gate, up = gate_up.chunk(2, dim=-1)
        return _plus(h, layer.down, self.act(gate) * up)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.quant_head is not None:  # the final norm inside its kernel where it can (_normed)
            logits = _normed(self.quant_head, self.final_norm, h)
        else:
            logits = F.linear(self.final_norm(h), self.lm_head, self.lm_head_bias)  # (N, V / tp), vocab padded to tp
        if self.layout.tp > 1:
            logits = self.comm.all_gather(logits, dim=-1)[:, :self.spec.vocab_size]
        return logits.float()

    def _pipeline(self, micro: list[_Micro]) -> torch.Tensor:
        """This stage's part of a pipelined pass: the first stage embeds each micro-batch, the others receive
        it from the previous stage (every receive posted up front, so the next micro-batch arrives while this
        one runs); each is sent on as soon as this stage is done with it, so the next stage starts on it while
        this one goes on with the next. The last stage's logits of every micro-batch, in order, on every rank."""
        L, H = self.layout, self.spec.hidden_size
        recvs = [] if L.first_stage else [self.comm.irecv_prev((mb.tokens.shape[0], H), self.dtype, self.device, tag=m)
                                          for m, mb in enumerate(micro)]
        sends, logits = [], []
        for m, mb in enumerate(micro):
            h = self._embed(mb.tokens, mb.pos) if L.first_stage else recvs[m].wait()  # (n, H)
            h = mb.layers(h)
            if L.last_stage:
                logits.append(self._logits(h if mb.pick is None else h[mb.pick]))
            else:
                sends.append(self.comm.isend_next(h, tag=m))
        for send in sends:
            send.wait()
        out = torch.cat(logits) if logits else None
        return self.comm.from_last_stage(out, (sum(mb.out_rows for mb in micro), self.spec.vocab_size),
                                         torch.float32, self.device)

    def _micro_count(self, n: int) -> int:
        return max(1, min(self.micro_batches or self.layout.pp, n))

    # ---- forward passes ---------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, lengths: list[int], slots: list[int] | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Packed prompts (no padding): tokens (T,) = concatenation of sequences of `lengths`.

        Writes K/V of sequence b at cache slot slots[b], positions 0..len-1. Returns the logits of
        every token (T, V) when all_logits, else of each sequence's last token (B, V).
        """
        if self.layout.pp > 1:
            return self._pipeline(self._prefill_micro_batches(tokens, lengths, slots, all_logits))
        packed = pack(lengths, slots, self.device)
        h = self.prefill_layers(self._embed(tokens, packed.pos), packed)
        return self._logits(h if all_logits else h[packed.last])

    def _prefill_micro_batches(self, tokens, lengths, slots, all_logits) -> list[_Micro]:
        """Whole sequences per micro-batch, about the same number of tokens in each."""
        slots = list(range(len(lengths))) if slots is None else list(slots)
        micro, start = [], 0
        for seqs in micro_batch_groups(lengths, self._micro_count(len(lengths))):
            sub = [lengths[b] for b in seqs]
            n = sum(sub)
            packed = pack(sub, slots[seqs.start:seqs.stop], self.device)
            micro.append(_Micro(tokens[start:start + n], packed.pos,
                                lambda h, packed=packed: self.prefill_layers(h, packed),
                                None if all_logits else packed.last, n if all_logits else len(sub)))
            start += n
        return micro

    def _prefill_layers(self, h: torch.Tensor, packed: Packed) -> torch.Tensor:
        """This stage's layers over packed tokens h (T, H): one attention call and one indexed K/V write
        per layer for all prompts."""
        T = h.shape[0]
        rope = self._rope_at(packed.pos, h.dtype)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, rope)  # (T, n, hd)
            if self.kv_cache:
                self._write_kv(li, layer, packed.slot, packed.pos, k, v)
            o = self.prefill_attention.attend(q, k, v, packed, self.slopes)  # (T, nh, hd)
            h = _plus(h, layer.o, o.reshape(T, -1))
            h = self._mlp(layer, h)
        return h

    def compile_prefill(self, **options) -> None:
        """torch.compile the layers of prefill (Inductor fuses the norms, rotary, K/V writes and activations)
        with the token count and batch size dynamic from the first call: one compilation serves every
        batch of prompts. Head counts and widths stay static."""
        compiled = torch.compile(self._prefill_layers, **options)

        def prefill_layers(h: torch.Tensor, packed: Packed) -> torch.Tensor:
            for t, dim in ((h, 0), *packed.dynamic()):
                if t.shape[dim] > 1:  # a dimension of 1 is specialised anyway
                    torch._dynamo.maybe_mark_dynamic(t, dim)
            return compiled(h, packed)

        self.prefill_layers = prefill_layers

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per cache slot 0..B-1: tokens (B,), pos (B,) its position. Returns (B, V).

        Static shapes and no host synchronisation: safe to capture in a CUDA graph.
        """
        B = tokens.shape[0]
        if self.layout.pp > 1:  # rows split into micro-batches of consecutive cache slots
            m = self._micro_count(B)
            bounds = [b * B // m for b in range(m + 1)]
            return self._pipeline([_Micro(tokens[a:b], pos[a:b],
                                          lambda h, a=a, b=b: self._decode_layers(h, pos[a:b], a), None, b - a)
                                   for a, b in zip(bounds, bounds[1:])])
        return self._logits(self._decode_layers(self._embed(tokens, pos), pos, 0))

    def _decode_layers(self, h: torch.Tensor, pos: torch.Tensor, first: int) -> torch.Tensor:
        """This stage's layers over h (B, H): the rows of cache slots first..first+B-1 at positions pos (B,)."""
        B = h.shape[0]
        S = self.kv_cache[0].shape[3]
        bidx = None if self.kv_in_attention else torch.arange(first, first + B, device=self.device)  # _write_kv's slots
        attn = self.decode_attention  # runtime/attention.py: "torch" masks the whole cache, "triton" reads live K/V
        state = attn.prepare(pos, S, self.slopes, h.dtype)  # shared by every layer (the torch entry's mask)
        rope = self._rope_at(pos, h.dtype)
        q_rope = {"rope": self._rope} if attn.rotates_q and self.rope_in_attention and rope is not None else {}
        for li, layer in enumerate(self.layers):
            # (B, n, hd); k rotated in attention with q when attention writes it
            q, k, v = self._qkv(layer, h, rope, rotate_q=not q_rope, rotate_k=not (q_rope and self.kv_in_attention))
            if self.kv_in_attention:  # k, v into the cache by the attention kernel (one kernel a layer fewer)
                o = attn.attend_writing(q, k, v, self.kv_cache[li], first, pos, state, kv_scale=layer.kv_scale,
                                        kv_format=self.kv, **q_rope)
            else:
                self._write_kv(li, layer, bidx, pos, k, v)
                kc, vc = self.kv_cache[li]  # views made here (see k_cache)
                o = attn.attend(q, kc[first:first + B], vc[first:first + B], pos, state,
                                kv_scale=layer.kv_scale, **q_rope)  # (B, nh, hd)
            h = _plus(h, layer.o, o.reshape(B, -1))
            h = self._mlp(layer, h)
        return h
