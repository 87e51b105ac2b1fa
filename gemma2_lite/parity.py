"""Compare gemma2_lite with Hugging Face transformers' Gemma 2, layer by layer.

When logits disagree, the first layer whose residual stream differs says where to look.
Needs the test extras (``pip install -e '.[test]'``: transformers and the CPU PyTorch wheel);
nothing else in the package imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from .model import Gemma2

__all__ = ["LayerDiff", "compare_layers", "format_report"]


@dataclass(frozen=True)
class LayerDiff:
    """Max absolute difference of one hidden state (name, value, and the reference's scale)."""

    name: str
    max_abs_diff: float
    ref_max_abs: float

    def __repr__(self) -> str:
        return (
            f"{self.name:>12}: max|diff| {self.max_abs_diff:.2e}  (max|ref| {self.ref_max_abs:.2e})"
        )


def compare_layers(
    model: Gemma2, hf_model, tokens, attention_mask=None, positions=None
) -> list[LayerDiff]:
    """Differences after the embedding, after each layer, and of the logits.

    tokens: int (B, T). ``hf_model`` is a ``transformers.Gemma2ForCausalLM`` holding the same
    weights (eager attention, same dtype). Positions default to cumsum(mask) - 1 for both.
    """
    import torch

    tokens = np.asarray(tokens)
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    ours = model.forward(
        jnp.asarray(tokens), jnp.asarray(mask), positions=jnp.asarray(positions), return_hidden=True
    )
    ours_logits, ours_hidden = ours.logits, ours.hidden
    assert ours_hidden is not None  # return_hidden=True
    with torch.no_grad():
        out = hf_model(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.asarray(positions), dtype=torch.long),
            output_hidden_states=True,
        )
    keep = mask.astype(bool)[..., None]  # compare real tokens only: padding rows are junk
    names = ["embedding"] + [f"layer {i}" for i in range(len(ours_hidden) - 2)] + ["final norm"]
    diffs = []
    for name, hidden, ref_hidden in zip(names, ours_hidden, out.hidden_states):
        mine, ref = np.asarray(hidden, np.float32), ref_hidden.float().numpy()
        diffs.append(
            LayerDiff(
                name, float(np.abs(np.where(keep, mine - ref, 0)).max()), float(np.abs(ref).max())
            )
        )
    ref_logits = out.logits.float().numpy()
    diffs.append(
        LayerDiff(
            "logits",
            float(np.abs(np.where(keep, ours_logits - ref_logits, 0)).max()),
            float(np.abs(ref_logits).max()),
        )
    )
    return diffs


def format_report(diffs: list[LayerDiff]) -> str:
    return "\n".join(repr(d) for d in diffs)
