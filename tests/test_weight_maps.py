"""Every checkpoint table, both directions, on random small models with prime dimensions.

Prime sizes (V, D, F and H/2 all different primes) make every axis distinguishable, so a transpose,
a mis-split head or a swapped stack shows up as a shape or value mismatch. N == K is drawn too,
where the Flax tables use ``qkv_einsum``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2_lite.checkpoint import (
    from_arrays,
    hf_state_dict,
    hf_to_arrays,
    load_flax,
    to_arrays,
    to_flax_tree,
    to_released_flax_tree,
)
from gemma2_lite.config import Gemma2Config
from gemma2_lite.params import param_shapes
from gemma2_lite.weight_maps import HF, export_arrays, flatten, flax_table, import_arrays

PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


@st.composite
def configs(draw: st.DrawFn) -> Gemma2Config:
    v, d, h, f = draw(st.lists(st.sampled_from(PRIMES), min_size=4, max_size=4, unique=True))
    k = draw(st.sampled_from((1, 2, 3)))
    groups = draw(st.sampled_from((1, 2, 3)))
    # RoPE needs an even head_dim: 2 x a prime, still unlike every other size.
    return Gemma2Config(
        vocab_size=v,
        d_model=d,
        num_layers=draw(st.integers(1, 3)),
        num_heads=k * groups,
        num_kv_heads=k,
        head_dim=2 * h,
        ffn_dim=f,
        query_pre_attn_scalar=h,
        sliding_window=4,
        max_seq_len=32,
    )


def random_params(config: Gemma2Config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(s).astype(np.float32) for p, s in param_shapes(config).items()}


def tables(config: Gemma2Config) -> list:
    qkv = config.num_heads == config.num_kv_heads
    out = [HF]
    for released in (False, True):
        for gating in ("DF", "FD"):
            out += [flax_table(released=released, gating=gating, qkv=q) for q in ({False, qkv})]
    return out


def hf_shapes(c: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """transformers' Gemma2 parameter shapes, written out independently of the table."""
    n, k, h, d, f = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.ffn_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (n * h, d),
                p + "self_attn.k_proj.weight": (k * h, d),
                p + "self_attn.v_proj.weight": (k * h, d),
                p + "self_attn.o_proj.weight": (d, n * h),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
        shapes.update(
            {
                p + norm + ".weight": (d,)
                for norm in (
                    "input_layernorm",
                    "post_attention_layernorm",
                    "pre_feedforward_layernorm",
                    "post_feedforward_layernorm",
                )
            }
        )
    return shapes


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(configs(), st.integers(0, 2**16))
def test_every_table_round_trips_both_ways(config: Gemma2Config, seed: int) -> None:
    ours = random_params(config, seed)
    for table in tables(config):
        theirs = export_arrays(table, config, ours)
        back, names = import_arrays(table, config, theirs)
        assert back.keys() == ours.keys() == names.keys(), table.name
        for path, value in ours.items():
            np.testing.assert_array_equal(back[path], value, err_msg=f"{table.name} {path}")
            assert names[path] in theirs
        # theirs -> ours -> theirs: the same tensors again
        again = export_arrays(table, config, back)
        assert again.keys() == theirs.keys()
        for key, value in theirs.items():
            np.testing.assert_array_equal(again[key], value, err_msg=f"{table.name} {key}")


@SETTINGS
@given(configs(), st.integers(0, 2**16))
def test_the_tables_write_the_published_shapes(config: Gemma2Config, seed: int) -> None:
    ours = random_params(config, seed)
    hf = export_arrays(HF, config, ours)
    assert {k: v.shape for k, v in hf.items()} == hf_shapes(config)
    n, k, h, d, f = (
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.d_model,
        config.ffn_dim,
    )
    for gating, shape in (("DF", (2, d, f)), ("FD", (2, f, d))):
        flat = export_arrays(flax_table(released=True, gating=gating), config, ours)
        assert flat["transformer/layer_0/mlp/gating_einsum/w"].shape == shape
        assert flat["transformer/layer_0/attn/kv_einsum/w"].shape == (2, k, d, h)
        assert flat["transformer/layer_0/attn/attn_vec_einsum/w"].shape == (n, h, d)
    if n == k:
        qkv = export_arrays(flax_table(qkv=True), config, ours)
        assert qkv["transformer/layer_0/attn/qkv_einsum/w"].shape == (3, n, d, h)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.integers(0, 2**16))
def test_every_public_format_round_trips_a_model(config: Gemma2Config, seed: int) -> None:
    """The public wrappers, model -> format -> model: HF state dict, the official tree, the
    released tree in both orientations (qkv_einsum where N == K)."""
    model = from_arrays(config, random_params(config, seed))
    ours = to_arrays(model)
    forms = {
        "hf": lambda: from_arrays(config, hf_to_arrays(config, hf_state_dict(model))),
        "flax": lambda: load_flax(to_flax_tree(model), config=config),
        "released DF": lambda: load_flax(to_released_flax_tree(model, gating="DF"), config=config),
        "released FD": lambda: load_flax(to_released_flax_tree(model, gating="FD"), config=config),
    }
    for name, load in forms.items():
        back = to_arrays(load())
        for path, value in ours.items():
            np.testing.assert_array_equal(back[path], value, err_msg=f"{name} {path}")
    keys = flatten(to_flax_tree(model))
    qkv = any("qkv_einsum" in k for k in keys)
    assert qkv == (config.num_heads == config.num_kv_heads)
