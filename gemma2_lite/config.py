"""Gemma 2 configuration: one frozen dataclass and the report's presets.

Letters follow the book's Notation page (``book/notation.md``): D model width, L layers,
N query heads, K key/value heads, H head dimension, F feed-forward width, V vocabulary,
W sliding window, C context length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from .checks import check_int, check_number

__all__ = [
    "Gemma2Config",
    "get_config",
    "PRESETS",
    "list_presets",
    "rope_base_from_hf",
    "ConfigError",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration that cannot describe a working Gemma 2 model."""


@dataclass(frozen=True)
class Gemma2Config:
    """Hyper-parameters of a Gemma 2 decoder (immutable; use :meth:`replace` for variants).

    Attributes:
      vocab_size: V, rows of the (tied) embedding table.
      d_model: D, width of the residual stream.
      num_layers: L. Even layers (0, 2, ...) use the sliding window, odd layers are global.
      num_heads: N query heads.
      num_kv_heads: K key/value heads; N must be a multiple of K (G = N / K queries share one).
      head_dim: H, even (RoPE rotates pairs of features).
      ffn_dim: F, hidden width of the GeGLU feed-forward block.
      query_pre_attn_scalar: queries are multiplied by ``query_pre_attn_scalar ** -0.5``.
        256 for 2B/9B (= head_dim), 144 for 27B (= D / N, *not* head_dim).
      sliding_window: W; a local layer's query at position q sees keys k with q - W < k <= q.
        ``None`` makes every layer global.
      attn_logit_softcap: c_a; attention logits become c_a * tanh(logits / c_a). ``None`` = off.
      final_logit_softcap: c_f; the same on the output logits. ``None`` = off.
      rope_base: θ, base of the rotary frequencies.
      max_seq_len: C, the longest sequence the model accepts.
      rms_norm_eps: ε inside RMSNorm.
      param_dtype: dtype the weights are stored in ("float32" or "bfloat16").
      dtype: dtype activations are computed in ("float32" or "bfloat16").
      name: the preset's name, for display.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    query_pre_attn_scalar: float
    sliding_window: int | None = 4096
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    rope_base: float = 10_000.0
    max_seq_len: int = 8192
    rms_norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"
    name: str = "custom"

    def __post_init__(self) -> None:
        # Every field through gemma2_lite.checks: a bool is never a size (True is not W = 1).
        positive = [
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "ffn_dim",
            "max_seq_len",
        ]
        for field in positive:
            # Sizes, ids and positions are int32 on the device: a larger one would wrap.
            if check_int(getattr(self, field), field, low=1, error=ConfigError) >= 2**31:
                raise ConfigError(
                    f"{field} must be below 2**31 (sizes are int32 on the "
                    f"device), got {getattr(self, field)}"
                )
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a str, got {type(self.name).__name__} {self.name!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each key/value head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim must be even for rotary embeddings (RoPE rotates feature pairs), "
                f"got {self.head_dim}"
            )
        if self.sliding_window is not None:
            check_int(
                self.sliding_window,
                "sliding_window",
                low=1,
                error=ConfigError,
                what="a positive integer or None (all layers global)",
            )
        # Finite, not just positive: an infinite soft-cap passes "> 0" but computes
        # inf * tanh(x / inf) = inf * 0 = NaN for every logit.
        for field in ("attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, field) is not None:
                check_number(
                    getattr(self, field),
                    field,
                    low=0,
                    low_open=True,
                    what="a positive finite number or None (no cap)",
                    error=ConfigError,
                )
        for field in ("query_pre_attn_scalar", "rope_base", "rms_norm_eps"):
            check_number(
                getattr(self, field),
                field,
                low=0,
                low_open=True,
                what="a positive finite number",
                error=ConfigError,
            )
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ConfigError(
                    f"{field} must be one of {sorted(_DTYPES)}, got {getattr(self, field)!r}"
                )

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_groups(self) -> int:
        """G = N / K: query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def query_scale(self) -> float:
        """Multiplier applied to queries before q·k."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def layer_types(self) -> tuple[str, ...]:
        """'local' (sliding window) for even layers, 'global' for odd ones."""
        if self.sliding_window is None:
            return ("global",) * self.num_layers
        return tuple("local" if i % 2 == 0 else "global" for i in range(self.num_layers))

    def window_for_layer(self, i: int) -> int | None:
        """Sliding window of layer ``i`` (None for a global layer)."""
        return self.sliding_window if self.layer_types[i] == "local" else None

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> Gemma2Config:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {sorted(unknown)}; "
                f"fields are {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __repr__(self) -> str:
        return (
            f"Gemma2Config({self.name}: V={self.vocab_size} D={self.d_model} L={self.num_layers} "
            f"N={self.num_heads} K={self.num_kv_heads} H={self.head_dim} F={self.ffn_dim} "
            f"W={self.sliding_window} C={self.max_seq_len} "
            f"q_scale={self.query_pre_attn_scalar}^-0.5 caps={self.attn_logit_softcap}/"
            f"{self.final_logit_softcap} params={self.param_dtype} act={self.dtype})"
        )


# Values from the Gemma 2 report (arXiv 2408.00118), table 1, and the public configs.
PRESETS: dict[str, Gemma2Config] = {
    "gemma2-2b": Gemma2Config(
        name="gemma2-2b",
        vocab_size=256_128,
        d_model=2304,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        ffn_dim=9216,
        query_pre_attn_scalar=256,
    ),
    "gemma2-9b": Gemma2Config(
        name="gemma2-9b",
        vocab_size=256_128,
        d_model=3584,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        ffn_dim=14_336,
        query_pre_attn_scalar=256,
    ),
    "gemma2-27b": Gemma2Config(
        name="gemma2-27b",
        vocab_size=256_128,
        d_model=4608,
        num_layers=46,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        ffn_dim=36_864,
        # (d_model / num_heads) ** -0.5 = 144 ** -0.5, not head_dim ** -0.5.
        query_pre_attn_scalar=144,
    ),
    # The book's own small model: trains on a laptop CPU, same architecture.
    # V matches the book's tokenizer (gemma2_lite/assets/tokenizer.model).
    "tiny": Gemma2Config(
        name="tiny",
        vocab_size=4096,
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        ffn_dim=512,
        query_pre_attn_scalar=32,
        sliding_window=64,
        max_seq_len=512,
    ),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_config(preset: str, /, **overrides: Any) -> Gemma2Config:
    """The preset called ``preset`` ('tiny', 'gemma2-2b', 'gemma2-9b', 'gemma2-27b'), with
    overrides."""
    key = preset.lower().replace("_", "-")
    if key in {"2b", "9b", "27b"}:
        key = f"gemma2-{key}"
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {list_presets()}")
    cfg = PRESETS[key]
    return cfg.replace(**overrides) if overrides else cfg


def rope_base_from_hf(hf: Mapping[str, Any]) -> Any:
    """θ from a Hugging Face ``config.json``, refusing any RoPE scaling Gemma 2 does not use.

    transformers 5.x writes ``rope_parameters`` (``{"rope_type": "default", "rope_theta":
    ...}``), 4.x ``rope_theta`` at the top and ``rope_scaling`` (``null`` for Gemma 2). A
    scaled RoPE (``linear``, ``dynamic``, ``yarn``, ``llama3``...) changes every rotation; this
    package implements the plain one only, so a config asking for another is refused instead
    of being run with the wrong positions. Raises :class:`ConfigError` naming the field.
    """
    theta = hf.get("rope_theta", 10_000.0)
    for field in ("rope_parameters", "rope_scaling"):
        value = hf.get(field)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config.json field {field!r} must be an object or null, got {type(value).__name__}"
            )
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config.json field {field!r} asks for {kind!r} RoPE scaling; "
                "Gemma 2 (and this package) use plain RoPE ('default' or null)"
            )
        theta = value.get("rope_theta", theta)
    return theta
