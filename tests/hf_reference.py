"""Build small random Hugging Face Gemma 2 models to test against (transformers + torch:
test-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_hf_model(
    *,
    vocab_size: int = 211,
    hidden_size: int = 60,
    intermediate_size: int = 94,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 6,
    num_key_value_heads: int = 2,
    head_dim: int = 14,
    query_pre_attn_scalar: float = 23,
    sliding_window: int = 7,
    max_position_embeddings: int = 128,
    seed: int = 0,
    attn_logit_softcapping: float | None = 50.0,
    final_logit_softcapping: float | None = 30.0,
    **extra: Any,
):
    """A random ``Gemma2ForCausalLM`` (float32, eager attention) with randomised norm weights.

    The reference initialises RMSNorm weights to zero, which would hide a (1 + w) bug; here
    they are drawn from N(0, 0.5). Attention logits get a larger spread too (weights scaled up)
    so that the soft-cap is actually exercised.
    """
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
        attn_logit_softcapping=attn_logit_softcapping,
        final_logit_softcapping=final_logit_softcapping,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
        **extra,
    )
    model = Gemma2ForCausalLM(cfg).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_logits(
    model,
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Reference logits (B, T, V) float32 as numpy."""
    import torch

    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()
