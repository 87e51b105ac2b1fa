"""The released Gemma 2 checkpoints' names, and where they live: one folder, one variable.

The weights live in ``$GEMMA2_LITE_WEIGHTS`` (default ``~/.cache/gemma2-lite/weights``), one
subfolder per model and layout, exactly as the publishers serve them (see
:mod:`gemma2_lite.weights`, which finds, verifies and downloads them, and
:mod:`gemma2_lite.fixtures`, which writes tiny stand-ins in the same layout).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "MODELS",
    "LAYOUTS",
    "FIXTURE_MARKER",
    "check_model",
    "weights_root",
    "model_dir",
    "flax_checkpoint_name",
]

#: The one environment variable naming the weights folder.
ENV_VAR = "GEMMA2_LITE_WEIGHTS"
#: The released Gemma 2 models (pre-trained, and "-it": instruction-tuned).
MODELS = (
    "gemma-2-2b",
    "gemma-2-2b-it",
    "gemma-2-9b",
    "gemma-2-9b-it",
    "gemma-2-27b",
    "gemma-2-27b-it",
)
LAYOUTS = ("hf", "flax")
#: A file that only :mod:`gemma2_lite.fixtures` writes: its folders are never "real weights".
FIXTURE_MARKER = "FIXTURE.md"


def check_model(name: str, layout: str) -> None:
    """Refuse (``ValueError``) a model name or layout that was never released."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {LAYOUTS} ('hf': Hugging Face safetensors, "
            f"'flax': the official Orbax checkpoint), got {layout!r}"
        )


def weights_root() -> Path:
    """``$GEMMA2_LITE_WEIGHTS``, or ``~/.cache/gemma2-lite/weights`` when it is unset."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "gemma2-lite" / "weights"


def model_dir(name: str, layout: str = "hf", root: str | os.PathLike | None = None) -> Path:
    """Where ``name`` in ``layout`` lives: ``root / name / layout`` (root: :func:`weights_root`)."""
    check_model(name, layout)
    return Path(root if root is not None else weights_root()) / name / layout


def flax_checkpoint_name(name: str) -> str:
    """The Orbax checkpoint's folder (and Kaggle variant) name: 'gemma-2-2b' -> 'gemma2-2b'."""
    return name.replace("gemma-2-", "gemma2-", 1)
