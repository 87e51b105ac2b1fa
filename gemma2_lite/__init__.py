"""gemma2-lite: Google DeepMind's Gemma 2, built piece by piece in JAX + Flax NNX.

    from gemma2_lite import Gemma2, get_config, param_counts
    cfg = get_config("gemma2-2b")
    param_counts(cfg)        # {"embedding": 590118912, "non_embedding": 2024517888}
"""

from .config import Gemma2Config, get_config, list_presets
from .model import Gemma2, param_counts

__all__ = ["Gemma2", "Gemma2Config", "get_config", "list_presets", "param_counts"]
__version__ = "0.1.0"
