"""Random Gemma 2 models drawn in numpy: no XLA compilation per parameter shape, unlike nnx init."""

from __future__ import annotations

import numpy as np
from flax import nnx

from gemma2_lite.checkpoint import from_arrays
from gemma2_lite.config import Gemma2Config
from gemma2_lite.model import Gemma2


def random_model(config: Gemma2Config, seed: int, *, qk_gain: float = 1.0) -> Gemma2:
    """A model with random weights, norm scales randomised too (a fresh model's zeros hide bugs).

    Weights are fan-in scaled so logits stay O(1). ``qk_gain`` > 1 scales query/key weights up so
    attention is peaky: then a wrong mask or a stale cache slot changes the logits by far more
    than a test's tolerance (near-uniform attention would hide it).
    """
    abstract = nnx.eval_shape(lambda: Gemma2(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape, name = tuple(var.shape), path[-1]
        if name == "scale":
            std = 0.3
        elif name == "embedding":                            # (V, D): rows of norm ~1
            std = 1.0 / np.sqrt(shape[1])
        elif name in ("q", "k", "v"):                        # (N|K, D, H): fan-in D
            std = (qk_gain if name != "v" else 1.0) / np.sqrt(shape[1])
        elif name == "o":                                    # (N, H, D): fan-in N*H
            std = 1.0 / np.sqrt(shape[0] * shape[1])
        else:                                                # gate/up (D, F), down (F, D)
            std = 1.0 / np.sqrt(shape[0])
        arrays[tuple(path)] = rng.normal(0.0, std, shape).astype(np.float32)
    return from_arrays(config, arrays)
