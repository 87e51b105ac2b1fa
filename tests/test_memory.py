"""The memory planner against the model itself, JAX's autodiff and XLA's compiled accounting.

(Parameter + AdamW bytes per device on a sharded mesh are checked exactly against XLA's
``memory_analysis`` in tests/test_sharding.py, which has 8 devices.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from gemma2_lite import Gemma2, Gemma2Config, get_config, param_counts
from gemma2_lite.losses import cross_entropy_loss
from gemma2_lite.memory import (
    CHIPS,
    REPORT_SETUPS,
    GiB,
    activation_bytes,
    comm_bytes,
    kv_cache_bytes,
    param_shard_elements,
    plan_memory,
    plan_table,
)
from gemma2_lite.model import abstract_model
from gemma2_lite.sharding import ShardingError


def next_token_loss(model: Gemma2, tokens: jax.Array) -> jax.Array:
    """The training objective: (B, T + 1) windows -> mean next-token cross-entropy."""
    return cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])


# Small and prime-ish: V 211, D 46, N 4 / K 2, H 14, F 94, W 5.
SMALL = dict(
    vocab_size=211,
    d_model=46,
    num_heads=4,
    num_kv_heads=2,
    head_dim=14,
    ffn_dim=94,
    query_pre_attn_scalar=14,
    sliding_window=5,
    max_seq_len=128,
)


def small(layers: int = 2, dtype: str = "float32") -> Gemma2Config:
    return get_config("tiny", num_layers=layers, dtype=dtype, param_dtype=dtype, **SMALL)


def test_param_elements_reproduce_the_report_counts() -> None:
    report = {
        "gemma2-2b": 590_118_912 + 2_024_517_888,
        "gemma2-9b": 917_962_752 + 8_324_201_984,
        "gemma2-27b": 1_180_237_824 + 26_047_480_320,
    }
    for name, total in report.items():
        assert param_shard_elements(get_config(name), {})[0] == total
    counts = param_counts(small(3))
    assert param_shard_elements(small(3), {})[0] == counts["embedding"] + counts["non_embedding"]


def test_param_elements_split_by_the_rules() -> None:
    cfg = small(3)  # D 46 = 2 x 23, V 211 prime
    whole, _ = param_shard_elements(cfg, {})
    # fsdp 2 splits every weight (all have D) except the norms; V is not split without model
    halves, uneven = param_shard_elements(cfg, {"fsdp": 2})
    norms = (4 * 3 + 1) * 46
    assert halves == (whole - norms) // 2 + norms and uneven == []
    _, uneven = param_shard_elements(cfg, {"model": 2})
    assert uneven == ["embedder.embedding dim 0 (211 over 2)"]  # padded to 106 rows a device


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("remat", [False, True])
def test_activation_formula_equals_jax_saved_residuals(dtype: str, remat: bool) -> None:
    """The formula counts exactly what autodiff keeps from the forward for the backward pass."""
    batch, length = 3, 11
    for layers in (1, 3):
        cfg = small(layers, dtype)
        graphdef, params = nnx.split(abstract_model(cfg, remat=remat))
        tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)

        def loss(p, t, graphdef=graphdef):
            return next_token_loss(nnx.merge(graphdef, p), t)

        residuals = saved_residuals(loss, params, tokens)
        got = sum(
            int(np.prod(a.shape)) * a.dtype.itemsize
            for a, where in residuals
            if "argument" not in where and "literal" not in where
        )
        want = activation_bytes(cfg, batch * length, length, remat=remat, peak=False)
        assert got == want, (dtype, remat, layers)


def test_remat_keeps_far_less_and_flash_drops_the_scores() -> None:
    cfg = get_config("gemma2-2b")
    full = activation_bytes(cfg, 8192, 8192)
    remat = activation_bytes(cfg, 8192, 8192, remat=True)
    assert remat < full / 5  # 26 layers' residuals vs one layer's + the block inputs
    flash = activation_bytes(cfg, 8192, 8192, flash=True)
    # the S-wide score residuals are (17 + a) S N bytes per token per layer
    assert full - flash == pytest.approx(cfg.num_layers * 8192 * (21 * 8192 + 4) * 8, rel=1e-9)


def test_activation_estimate_against_xla_compiled_temp() -> None:
    """XLA's buffer assignment for the gradient needs 45-100% of the planned activations.

    The formula is an upper bound: XLA fuses elementwise chains (soft-cap, GELU), so some
    residuals never exist as buffers, and it frees each layer's residuals as the backward pass
    consumes them. Measured here on CPU: 0.55-0.8. (XLA's CPU backend drops remat's
    optimisation barriers, so remat is not visible in CPU memory stats; the formula for it is
    checked against the saved residuals above.)
    """
    cfg = small(4)
    batch, length = 4, 37
    graphdef, params = nnx.split(abstract_model(cfg))
    tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)

    def grads(p, t):
        return jax.grad(lambda q: next_token_loss(nnx.merge(graphdef, q), t))(p)

    stats = jax.jit(grads).lower(params, tokens).compile().memory_analysis()
    planned = activation_bytes(cfg, batch * length, length)
    assert 0.45 <= stats.temp_size_in_bytes / planned <= 1.0, stats.temp_size_in_bytes / planned
    # the gradient (the output) is exactly one parameter copy (+ XLA's 8-byte pointer per
    # output of the result tuple)
    n_out = len(jax.tree.leaves(params))
    assert stats.output_size_in_bytes == 4 * param_shard_elements(cfg, {})[0] + 8 * n_out


@pytest.mark.parametrize("length", [3, 5, 17])
def test_kv_cache_bytes_equal_the_models_cache(length: int) -> None:
    cfg = small(3)  # local, global, local; W = 5
    model = nnx.eval_shape(lambda: Gemma2(cfg, rngs=nnx.Rngs(0)))
    cache = model.init_cache(2, length)
    nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert kv_cache_bytes(cfg, 2, length) == nbytes
    glob = cfg.replace(sliding_window=None)
    all_global = nnx.eval_shape(lambda: Gemma2(glob, rngs=nnx.Rngs(0))).init_cache(2, length)
    want = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(all_global))
    assert kv_cache_bytes(cfg, 2, length, ring_buffer=False) == want
    assert (kv_cache_bytes(cfg, 2, length) < want) == (length > 5)


def test_plan_memory_sums_and_fits() -> None:
    cfg = get_config("gemma2-2b")
    plan = plan_memory(
        cfg,
        {"fsdp": 8},
        batch=8,
        seq=1024,
        chip="tpu-v5e",
        param_dtype="bfloat16",
        act_dtype="bfloat16",
    )
    elems = param_shard_elements(cfg, {"fsdp": 8})[0]
    assert plan.params == plan.grads == 2 * elems
    assert plan.optimizer == 8 * elems + 8 and plan.master == 4 * elems
    assert plan.train == plan.params + plan.grads + plan.optimizer + plan.master + plan.activations
    assert plan.fits(remat=True) == (plan.train_remat <= 16 * GiB)
    fp32 = plan_memory(cfg, {"fsdp": 8}, batch=8, seq=1024)
    assert fp32.master == 0 and fp32.chip is None and fp32.fits() is None
    with pytest.raises(KeyError, match="unknown chip"):
        plan_memory(cfg, {}, batch=1, seq=8, chip="tpu-v9")
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        plan_memory(cfg, {"tensor": 4}, batch=1, seq=8)


def test_report_setups_table() -> None:
    rows = plan_table(print_it=False, param_dtype="bfloat16", act_dtype="bfloat16")
    assert [r["devices"] for r in rows] == [512, 4096, 6144]
    assert [r["HBM GiB"] for r in rows] == [16.0, 32.0, 95.0]
    assert {s.chip for s in REPORT_SETUPS} <= set(CHIPS)
    for r in rows:
        assert r["train remat GiB"] < r["train GiB"]
        assert r["KV cache GiB"] < r["KV no ring GiB"]


def test_comm_bytes_by_axis() -> None:
    cfg = small(2)
    total = 4 * param_shard_elements(cfg, {})[0]
    data = comm_bytes(cfg, {"data": 4}, batch=8, seq=16, dtype_bytes=4)
    assert data["data all-reduce"] == pytest.approx(2 * 3 / 4 * total)
    assert data["fsdp all-gather"] == data["model all-reduce"] == 0
    fsdp = comm_bytes(cfg, {"fsdp": 2}, batch=8, seq=16, dtype_bytes=4)
    # every weight but the norms is split in two: a device receives the other half twice (forward
    # and backward all-gather) and sends half of its gradient once (reduce-scatter)
    split_elements = total // 4 - (4 * 2 + 1) * 46
    assert fsdp["fsdp all-gather"] == pytest.approx(2 * split_elements / 2 * 4)
    assert fsdp["fsdp reduce-scatter"] == pytest.approx(split_elements / 2 * 4)
    assert fsdp["data all-reduce"] == 0
    tp = comm_bytes(cfg, {"model": 2}, batch=8, seq=16, dtype_bytes=4)
    assert tp["model all-reduce"] == pytest.approx((4 * 2 + 2) * 2 * 0.5 * 8 * 16 * 46 * 4)
