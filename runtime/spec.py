"""ModelSpec: the one description of a decoder that every family maps onto (the engine's IR)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    family: str  # HF model_type of the source, for provenance only: the runtime never branches on it
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    norm: str = "rms"  # rms | layer
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | alibi | learned
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0: the whole head; GPT-NeoX style partial rotary otherwise
    mlp: str = "gated"  # gated (gate/up/down, act(gate)*up) | plain (up/down)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # layer norms carry a bias
    embedding_norm: bool = False  # BLOOM: a layer norm right after the embedding
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos_token: bool = False  # the runtime prepends BOS to prompts that lack it
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelSpec fields {sorted(unknown)}")
        return cls(**d)
