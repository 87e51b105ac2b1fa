"""gemma2-lite: Google DeepMind's Gemma 2, built piece by piece in JAX + Flax NNX.

    from gemma2_lite import Gemma2, get_config, param_counts
    cfg = get_config("gemma2-2b")
    param_counts(cfg)        # {"embedding": 590118912, "non_embedding": 2024517888}

The names below are imported on first use (PEP 562), so ``import gemma2_lite`` and the
command lines start without loading JAX; ``gemma2_lite.model`` and the other modules are
reached the same way.
"""

import importlib
import sys
from typing import Any

if sys.argv[:1] == ["-m"]:
    # `python -m gemma2_lite[.module]`: this runs before the program's own imports (JAX takes
    # seconds), so Ctrl-C during them ends quietly with status 130 (gemma2_lite.cmdline).
    from . import cmdline as _cmdline

    _cmdline.arm()

__all__ = ["Gemma2", "Gemma2Config", "get_config", "list_presets", "param_counts"]
__version__ = "0.1.0"

_LAZY = {
    "Gemma2": "model",
    "param_counts": "model",
    "Gemma2Config": "config",
    "get_config": "config",
    "list_presets": "config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
