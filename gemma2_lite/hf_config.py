"""Gemma 2's Hugging Face ``config.json``: read (transformers 4.x and 5.x files) and written."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from .config import ConfigError, Gemma2Config, rope_base_from_hf
from .safetensors_io import CheckpointError, read_json

__all__ = ["config_from_hf", "config_to_hf", "declared_dtype", "read_hf_config"]

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


# Our config field <- the Hugging Face config.json field it is read from (required fields).
_HF_REQUIRED = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_dim": "intermediate_size",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
}
_HF_OPTIONAL = {
    "sliding_window": "sliding_window",
    "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping",
    "rope_base": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
}


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Gemma2Config:
    """A :class:`Gemma2Config` from a Hugging Face ``config.json`` (transformers 4.x or 5.x).

    Both generations of the file are read. The released Gemma 2 folders were written by
    transformers 4.42: ``rope_theta`` at the top level, no ``layer_types`` (the alternation is
    implied), ``hidden_act`` next to ``hidden_activation``, ``eos_token_id`` ``[1, 107]`` on the
    -it models, and keys the model does not need (``cache_implementation``, ``use_cache``,
    ``torch_dtype``...), which are ignored. transformers 5.x writes ``rope_parameters`` and
    ``layer_types`` instead.

    Raises :class:`CheckpointError` naming the config.json field that is missing or invalid.
    """
    if not isinstance(hf, Mapping):
        raise CheckpointError(
            f"config.json must be a JSON object of fields, got {type(hf).__name__}"
        )
    if hf.get("model_type") not in (None, "gemma2"):
        raise CheckpointError(
            f"config.json is for model_type {hf.get('model_type')!r}, expected 'gemma2'"
        )
    missing = [name for name in _HF_REQUIRED.values() if name not in hf]
    if missing:
        raise CheckpointError(
            f"config.json lacks the field(s) {missing} that a Gemma 2 config needs"
        )
    try:
        rope_base = rope_base_from_hf(hf)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    # sliding_window_size: the name some early Gemma 2 configs and ports used for it.
    window = hf.get("sliding_window", hf.get("sliding_window_size"))
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise CheckpointError(
                f"config.json field 'layer_types' must be a list, got {type(layer_types).__name__}"
            )
        if all(t == "full_attention" for t in layer_types):
            window = None
        else:
            alternating = [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(len(layer_types))
            ]
            if list(layer_types) != alternating or len(layer_types) != n_layers:
                raise CheckpointError(
                    "config.json layer_types must alternate sliding/full starting with sliding "
                    f"(Gemma 2's pattern), one per layer, or be all full; got {layer_types[:8]}"
                )
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"activation {act!r} is not Gemma 2's tanh GELU")
    fields = {ours: hf[theirs] for ours, theirs in _HF_REQUIRED.items()}
    fields.update(
        sliding_window=window,
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        rope_base=rope_base,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        name=str(hf.get("_name_or_path") or "hf"),
    )
    fields.update(overrides)
    try:
        return Gemma2Config(**fields)
    except ConfigError as exc:
        field = str(exc).split(" ", 1)[0]
        theirs = {**_HF_REQUIRED, **_HF_OPTIONAL}.get(field)
        where = f" (config.json field {theirs!r})" if theirs and field not in overrides else ""
        raise CheckpointError(f"config.json describes no valid Gemma 2: {exc}{where}") from None


def declared_dtype(hf: Mapping[str, Any]) -> str | None:
    """The weights' dtype a ``config.json`` declares (``dtype``, or transformers 4's
    ``torch_dtype``), if it is one the model can use; else None."""
    for key in ("dtype", "torch_dtype"):
        if hf.get(key) in _DTYPE_NAMES:
            return str(hf[key])
    return None


def read_hf_config(
    path: str | os.PathLike,
    dtype: Any = None,
    param_dtype: Any = None,
    *,
    fallback_dtype: Any = jnp.float32,
    **overrides: Any,
) -> Gemma2Config:
    """The :class:`Gemma2Config` of a Hugging Face checkpoint folder's ``config.json``.

    ``dtype`` is the activation dtype and, unless ``param_dtype`` is given, the parameter
    dtype. ``None`` (the default) means the dtype the checkpoint declares, as transformers'
    ``dtype="auto"``: ``config.json``'s ``dtype`` / ``torch_dtype``, else ``fallback_dtype``.
    Every problem is a :class:`CheckpointError` naming the file and field.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
    hf = read_json(cfg_file, "config")
    if dtype is None and isinstance(hf, Mapping):
        dtype = declared_dtype(hf) or fallback_dtype
    dtype = fallback_dtype if dtype is None else dtype
    try:
        return config_from_hf(
            hf,
            dtype=jnp.dtype(dtype).name,
            param_dtype=jnp.dtype(param_dtype or dtype).name,
            **overrides,
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg_file}: {exc}") from None


def config_to_hf(config: Gemma2Config) -> dict[str, Any]:
    """The Hugging Face ``config.json`` describing ``config``."""
    c = config
    layer_types = ["sliding_attention" if t == "local" else "full_attention" for t in c.layer_types]
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window or c.max_seq_len,
        "layer_types": layer_types,
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": c.param_dtype,
        "torch_dtype": c.param_dtype,
    }
