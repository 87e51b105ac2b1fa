"""Random Gemma 2 models drawn in numpy: no XLA compilation per parameter shape, unlike nnx init."""

from __future__ import annotations

from gemma2_lite.checkpoint import from_arrays
from gemma2_lite.config import Gemma2Config
from gemma2_lite.fixtures import random_arrays
from gemma2_lite.model import Gemma2


def random_model(config: Gemma2Config, seed: int, *, qk_gain: float = 1.0) -> Gemma2:
    """A model with random weights, norm scales randomised too (a fresh model's zeros hide bugs).

    See :func:`gemma2_lite.fixtures.random_arrays` (the fixtures draw their weights the same way).
    """
    return from_arrays(config, random_arrays(config, seed, qk_gain=qk_gain))
