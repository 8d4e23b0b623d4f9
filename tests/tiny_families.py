"""Tiny random checkpoints of the four families with the real transformers classes (as helpers.random_checkpoint:
every parameter random and spread wide, so greedy tokens vary and never hinge on a near-tie, unlike the
`dummy` source's uniform weights, whose BLOOM / GPT-2 / BigCode repeat one token). Widths: every linear's
in_features is 128 or 256, so int4 groups of 64 divide them at tp2 (attn.o keeps 64 per rank)."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
CONFIGS = {  # family -> (transformers model and config classes, config)
    "llama": ("LlamaForCausalLM LlamaConfig", dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)),  # GQA
    "gpt2": ("GPT2LMHeadModel GPT2Config", dict(vocab_size=VOCAB, n_embd=128, n_inner=256, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=1, eos_token_id=2)),
    "bloom": ("BloomForCausalLM BloomConfig", dict(vocab_size=VOCAB, hidden_size=128, n_layer=2, n_head=4, bos_token_id=1,
                            eos_token_id=2, pad_token_id=3)),  # ALiBi, embedding layernorm
    "gpt_bigcode": ("GPTBigCodeForCausalLM GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=128, n_inner=256, n_layer=2, n_head=4,
                                       multi_query=True, n_positions=128, bos_token_id=1, eos_token_id=2)),  # MQA
}


def family_checkpoint(root: Path, family: str) -> Path:
    """The family's tiny checkpoint under root (made once per root)."""
    folder = root / f"tiny-{family}"
    if not (folder / "config.json").is_file():
        import transformers

        classes, cfg = CONFIGS[family]
        model_class, config_class = (getattr(transformers, c) for c in classes.split())
        torch.manual_seed(list(CONFIGS).index(family))
        model = model_class(config_class(initializer_range=0.1, **cfg))
        with torch.no_grad():
            for p in model.parameters():  # biases and norms too
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(str(folder))
    return folder
