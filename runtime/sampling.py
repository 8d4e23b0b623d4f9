"""Token selection from logits: greedy, temperature, top-k, top-p. Pure tensor ops, no host sync."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) float -> token ids (B,)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    if top_k and top_k < logits.shape[-1]:  # on the raw logits: dividing by a huge temperature would tie them
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Shift the max to 0 and keep the divisor a normal number of the logits' dtype: a temperature that rounds
    # to 0 there gives 0/0 = nan at the argmax, one that rounds to inf gives -inf/inf = nan at the masked
    # tokens. Valid ranges: params.py.
    info = torch.finfo(logits.dtype)
    logits = (logits - logits.amax(-1, keepdim=True)) / min(max(temperature, info.tiny), info.max)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # also when top_p rounds to 0 in the logits' dtype
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
