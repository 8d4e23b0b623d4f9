"""The per-rank layout of a multi-rank engine (heads, KV heads, ALiBi slopes, layers, vocabulary of one
rank) and Comm, the collectives the decoder calls. Global rank = pp_rank * tp + tp_rank: the ranks of one
pipeline stage are neighbours, so a tensor-parallel group stays on one node when tp fits in it.

Build (runtime/shard.py, engine_factory/stages/build.py) and runtime read the same layout, so a rank file
holds exactly what the decoder of that rank uses."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch

from .spec import ModelSpec

EMBEDDING_SHARDING = ("none", "vocab", "hidden")


def _split(n: int, parts: int, i: int) -> range:
    size = n // parts
    return range(i * size, (i + 1) * size)


@dataclass(frozen=True)
class RankLayout:
    tp: int
    pp: int
    rank: int
    tp_rank: int
    pp_rank: int
    num_heads: int  # of the whole model
    num_kv_heads: int
    heads: range  # the query heads this rank computes
    kv_heads: range  # the KV heads those query heads read (copied on kv_replicas ranks)
    kv_replicas: int  # ranks holding a copy of each KV head: tp // num_kv_heads when tp exceeds them, else 1
    layers: range  # this pipeline stage's decoder layers
    vocab_size: int
    padded_vocab: int  # vocab_size rounded up to a multiple of tp (vocab splits)
    vocab: range  # this rank's rows of a vocab-split table, padding rows included
    embedding_sharding: str  # none | vocab | hidden
    share_embedding: bool
    tied: bool  # the model ties lm_head to the embedding
    mlp_gated: bool  # mlp.up holds [gate | up]

    @classmethod
    def of(cls, spec: ModelSpec, mapping: dict, rank: int) -> "RankLayout":
        """mapping: engine.json's {tp, pp, world_size, embedding_sharding, share_embedding} (the last three
        optional); rank: the global rank."""
        tp, pp = int(mapping.get("tp", 1)), int(mapping.get("pp", 1))
        nh, nkv, L = spec.num_heads, spec.num_kv_heads, spec.num_layers
        sharding = mapping.get("embedding_sharding", "none")
        if not 0 <= rank < tp * pp:
            raise ValueError(f"rank {rank} is outside a world of tp={tp} x pp={pp}")
        if nh % tp or (nkv % tp and tp % nkv) or L % pp or sharding not in EMBEDDING_SHARDING:
            raise ValueError(f"tp={tp} pp={pp} embedding_sharding={sharding} does not fit {nh} heads, "
                             f"{nkv} KV heads, {L} layers")
        tp_rank, pp_rank = rank % tp, rank // tp
        replicas = max(1, tp // nkv)
        # With fewer KV heads than ranks, the tp/nkv ranks of one KV group each hold that group's head.
        kv = range(tp_rank // replicas, tp_rank // replicas + 1) if replicas > 1 else _split(nkv, tp, tp_rank)
        padded = -(-spec.vocab_size // tp) * tp
        return cls(tp=tp, pp=pp, rank=rank, tp_rank=tp_rank, pp_rank=pp_rank, num_heads=nh, num_kv_heads=nkv,
                   heads=_split(nh, tp, tp_rank), kv_heads=kv, kv_replicas=replicas,
                   layers=_split(L, pp, pp_rank), vocab_size=spec.vocab_size, padded_vocab=padded,
                   vocab=_split(padded, tp, tp_rank), embedding_sharding=sharding,
                   share_embedding=bool(mapping.get("share_embedding", False)),
                   tied=spec.tie_word_embeddings, mlp_gated=spec.mlp == "gated")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def first_stage(self) -> bool:  # holds the embeddings
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:  # holds the final norm and the lm_head
        return self.pp_rank == self.pp - 1

    @property
    def head_uses_embed(self) -> bool:
        """The lm_head is this rank's embedding table: tied models at tp1, or shared vocab slices; a
        rank stores a separate lm_head.weight otherwise (a tied model's last stage without embeddings)."""
        return self.tied and self.first_stage and self.last_stage and (self.tp == 1 or self.share_embedding)

    def alibi_slopes(self) -> torch.Tensor:
        """(n_heads,) fp32: the slopes of this rank's heads, sliced from the model's."""
        from .model import alibi_slopes  # model imports this module

        return alibi_slopes(self.num_heads)[self.heads.start:self.heads.stop]


class Comm:
    """Collectives over an initialized torch.distributed default group (one process per rank), or none
    (Comm.single(): world 1, every op returns its input). tp: the ranks of one pipeline stage; pp: the
    ranks of one tensor-parallel position across stages."""

    def __init__(self, tp: int, pp: int = 1, timeout: timedelta | None = None):
        """timeout: of every collective in the tp and pp groups (torch's default for subgroups is 30
        minutes, whatever the default group's): a rank that stops answering ends the others' calls then."""
        import torch.distributed as dist

        world = dist.get_world_size()
        if world != tp * pp:
            raise ValueError(f"the process group has {world} ranks but tp={tp} x pp={pp} needs {tp * pp}")
        self._dist = dist
        self.tp, self.pp, self.rank = tp, pp, dist.get_rank()
        self.tp_rank, self.pp_rank = self.rank % tp, self.rank // tp
        self.tp_group = self.pp_group = None
        # gloo's send/recv read and write host memory: CUDA tensors go through a host copy (several ranks
        # on one GPU run gloo, as NCCL refuses two ranks on one device)
        self._host_p2p = dist.get_backend() == "gloo"
        # new_group is collective: every rank creates every group, in the same order.
        if tp > 1:
            for p in range(pp):
                g = dist.new_group([p * tp + t for t in range(tp)], timeout=timeout)
                if p == self.pp_rank:
                    self.tp_group = g
        if pp > 1:
            for t in range(tp):
                g = dist.new_group([p * tp + t for p in range(pp)], timeout=timeout)
                if t == self.tp_rank:
                    self.pp_group = g

    @classmethod
    def single(cls) -> "Comm":
        c = cls.__new__(cls)
        c._dist, c.tp, c.pp, c.rank, c.tp_rank, c.pp_rank, c._host_p2p = None, 1, 1, 0, 0, 0, False
        c.tp_group = c.pp_group = None
        return c

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tp group, in place; returns x."""
        if self.tp > 1:
            self._dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the tp group, in place; returns x."""
        if self.tp > 1:
            self._dist.all_reduce(x, op=self._dist.ReduceOp.MAX, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The tp group's pieces of x concatenated along dim, in tp-rank order."""
        if self.tp == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        self._dist.all_gather(parts, x, group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def isend_next(self, x: torch.Tensor, tag: int = 0) -> "_Pending":
        """Start sending x to the same tp position of the next pipeline stage; wait() before x changes."""
        x = x.contiguous()
        x = x.cpu() if self._host_p2p else x
        return _Pending(self._dist.isend(x, dst=self.rank + self.tp, tag=tag), x)

    def irecv_prev(self, shape, dtype: torch.dtype, device=None, tag: int = 0) -> "_Pending":
        """Start receiving a tensor of shape/dtype from the previous stage; wait() returns it on device."""
        device = torch.device(device or "cpu")
        host = self._host_p2p and device.type != "cpu"
        buf = torch.empty(shape, dtype=dtype, device="cpu" if host else device)
        return _Pending(self._dist.irecv(buf, src=self.rank - self.tp, tag=tag), buf, device if host else None)

    def from_last_stage(self, x: torch.Tensor | None, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The last stage's x on every stage (broadcast over the pp group); x is None elsewhere."""
        if self.pp == 1:
            return x
        x = torch.empty(shape, dtype=dtype, device=device) if x is None else x.contiguous()
        self._dist.broadcast(x, src=(self.pp - 1) * self.tp + self.tp_rank, group=self.pp_group)
        return x


class _Pending:
    """A point-to-point transfer in flight: wait() ends it and returns its tensor (a receive's, on its device)."""

    def __init__(self, work, tensor: torch.Tensor, device: torch.device | None = None):
        self.work, self.tensor, self.device = work, tensor, device  # the tensor lives until the transfer ends

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.tensor if self.device is None else self.tensor.to(self.device)


MICRO_BATCHES_ENV = "EF_MICRO_BATCHES"  # a runtime setting (not in the engine, not hashed), read per Decoder


def micro_batches_setting(value=None) -> int | None:
    """The micro-batches of a pipelined pass: value, else $EF_MICRO_BATCHES, else None (auto: pp). Every rank
    of an engine must use the same number (the spawned and launched ranks inherit the environment)."""
    import os

    from .errors import UserError

    raw = os.environ.get(MICRO_BATCHES_ENV, "") if value is None else value
    if raw in ("", "auto", None):
        return None
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if isinstance(raw, bool) or n < 1 or str(n) != str(raw).strip():
        raise UserError(f"{MICRO_BATCHES_ENV}={raw!r}: want a whole number >= 1, or auto (= pp)")
    return n


def micro_batch_groups(sizes: list[int], m: int) -> list[range]:
    """m (at most len(sizes)) contiguous, non-empty ranges of the items whose sizes are given, each about
    sum(sizes) / m in size: the sequences of each prefill micro-batch, balanced by tokens."""
    n = len(sizes)
    m = max(1, min(m, n))
    cum, total = [], 0
    for s in sizes:
        total += s
        cum.append(total)
    bounds = [0]
    for k in range(1, m):
        target = k * total / m
        cut = min(range(1, n + 1), key=lambda j: abs(cum[j - 1] - target))  # the cut nearest the target
        bounds.append(max(bounds[-1] + 1, min(cut, n - (m - k))))
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
