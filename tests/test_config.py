"""Config presets, validation, and the report's parameter counts."""

import dataclasses

import pytest

from gemma2_lite import Gemma2Config, get_config, param_counts
from gemma2_lite.checkpoint import CheckpointError, config_from_hf, config_to_hf
from gemma2_lite.config import ConfigError, rope_base_from_hf

# The Gemma 2 report's table (embedding / non-embedding parameters).
REPORT_COUNTS = {
    "gemma2-2b": (590_118_912, 2_024_517_888),
    "gemma2-9b": (917_962_752, 8_324_201_984),
    "gemma2-27b": (1_180_237_824, 26_047_480_320),
}


@pytest.mark.parametrize("name", sorted(REPORT_COUNTS))
def test_param_counts_match_report(name):
    emb, non_emb = REPORT_COUNTS[name]
    assert param_counts(get_config(name)) == {"embedding": emb, "non_embedding": non_emb}


def test_param_counts_hf_vocab_changes_only_embedding():
    counts = param_counts(get_config("gemma2-2b", vocab_size=256_000))
    assert counts["embedding"] == 256_000 * 2304
    assert counts["non_embedding"] == REPORT_COUNTS["gemma2-2b"][1]


@pytest.mark.parametrize("layers", [1, 3])
def test_param_counts_equal_the_whole_models_parameters(layers):
    # param_counts traces one layer and multiplies: the same as counting a whole model
    import jax
    import numpy as np
    from flax import nnx

    from gemma2_lite.model import abstract_model

    cfg = get_config("tiny", num_layers=layers, vocab_size=300)
    model = abstract_model(cfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    counts = param_counts(cfg)
    assert counts["embedding"] == 300 * cfg.d_model
    assert counts["embedding"] + counts["non_embedding"] == total


def test_presets_follow_the_spec():
    c2, c9, c27 = (get_config(n) for n in ("gemma2-2b", "gemma2-9b", "gemma2-27b"))
    assert (c2.d_model, c2.num_layers, c2.num_heads, c2.num_kv_heads, c2.head_dim, c2.ffn_dim) == (
        2304,
        26,
        8,
        4,
        256,
        9216,
    )
    assert (c9.d_model, c9.num_layers, c9.num_heads, c9.num_kv_heads, c9.head_dim, c9.ffn_dim) == (
        3584,
        42,
        16,
        8,
        256,
        14336,
    )
    assert (
        c27.d_model,
        c27.num_layers,
        c27.num_heads,
        c27.num_kv_heads,
        c27.head_dim,
        c27.ffn_dim,
    ) == (4608, 46, 32, 16, 128, 36864)
    # The 27B query scale uses d_model / num_heads = 144, not head_dim = 128.
    assert c27.query_scale == pytest.approx(144**-0.5)
    assert c27.query_scale != pytest.approx(c27.head_dim**-0.5)
    assert c2.query_scale == c9.query_scale == pytest.approx(256**-0.5)
    for c in (c2, c9, c27):
        assert (c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap) == (4096, 50.0, 30.0)
        assert (c.rope_base, c.max_seq_len, c.rms_norm_eps, c.vocab_size) == (
            10_000.0,
            8192,
            1e-6,
            256_128,
        )


def test_layer_types_alternate_starting_local():
    c = get_config("gemma2-2b")
    assert c.layer_types[:4] == ("local", "global", "local", "global")
    assert c.window_for_layer(0) == 4096 and c.window_for_layer(1) is None
    assert set(get_config("tiny", sliding_window=None).layer_types) == {"global"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"head_dim": 31}, "even"),
        ({"d_model": 0}, "positive integer"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"attn_logit_softcap": -1.0}, "attn_logit_softcap"),
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"num_layers": 2.5}, "positive integer"),
        # A bool is never a size: True is not W = 1, not one layer, not a cap of 1.0.
        ({"sliding_window": True}, r"sliding_window must be a positive integer or None .*got True"),
        ({"num_layers": True}, r"num_layers must be a positive integer, got True"),
        ({"vocab_size": False}, r"vocab_size must be a positive integer, got False"),
        ({"final_logit_softcap": True}, r"final_logit_softcap must be a positive finite number"),
        ({"rope_base": float("inf")}, r"rope_base must be a positive finite number, got inf"),
    ],
)
def test_impossible_configs_fail_clearly(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_config("tiny").replace(**changes)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'gemma3'.*gemma2-2b"):
        get_config("gemma3")
    with pytest.raises(ConfigError, match="unknown config field"):
        get_config("tiny").replace(n_layers=3)


def test_config_is_frozen_and_round_trips():
    c = get_config("gemma2-9b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 1  # type: ignore[misc]
    assert Gemma2Config.from_dict(c.to_dict()) == c
    assert get_config("9b") == c
    assert "D=3584" in repr(c)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 4.0}),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 8.0}),
    ],
)
def test_an_unknown_rope_scaling_is_refused(field, value):
    """A scaled RoPE changes every rotation; ignoring it would run the wrong positions."""
    hf = {**config_to_hf(get_config("tiny")), field: value}
    kind = value.get("rope_type", value.get("type"))
    with pytest.raises(CheckpointError, match=rf"field '{field}' asks for '{kind}' RoPE scaling"):
        config_from_hf(hf)
    with pytest.raises(CheckpointError, match=rf"'{field}' must be an object or null, got list"):
        config_from_hf({**hf, field: [1]})


def test_plain_rope_in_either_spelling_is_read():
    hf = config_to_hf(get_config("tiny", rope_base=500.0))
    assert rope_base_from_hf(hf) == 500.0  # transformers 5.x
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert rope_base_from_hf({**old, "rope_scaling": None}) == 500.0  # 4.x
    assert rope_base_from_hf({**old, "rope_scaling": {"rope_type": "default"}}) == 500.0
    assert rope_base_from_hf({}) == 10_000.0


def test_a_bool_sliding_window_in_config_json_is_refused():
    hf = {**config_to_hf(get_config("tiny")), "sliding_window": True, "layer_types": None}
    with pytest.raises(
        CheckpointError,
        match=r"sliding_window must be a positive integer or "
        r"None.*got True \(config.json field 'sliding_window'\)",
    ):
        config_from_hf(hf)
