"""Sharding on 8 emulated CPU devices: layouts, sharded init, forward, AdamW step, loading.

JAX fixes its device count when it is first imported, and the rest of the suite runs with one
device in the same pytest process. So in the main process this file has a single test that
re-runs this same file in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
and ``GEMMA2_LITE_SHARDING_CHILD=1``; in that child the real tests below are collected.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CHILD_ENV = "GEMMA2_LITE_SHARDING_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"

if not IN_CHILD:

    def test_sharding_on_8_emulated_devices() -> None:
        env = dict(os.environ)
        env[CHILD_ENV] = "1"
        # 8 emulated devices; and a cheaper LLVM pipeline, since compiling the SPMD train step
        # dominates this test's time on a small CPU (both sides of each comparison use it).
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
            " --xla_backend_optimization_level=0"
            " --xla_llvm_disable_expensive_passes=true"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                str(Path(__file__).resolve()),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=Path(__file__).resolve().parent.parent,
        )
        print(result.stdout[-3000:])
        assert result.returncode == 0, (
            f"sharding tests failed in the 8-device subprocess:\n{result.stdout[-8000:]}\n"
            f"{result.stderr[-3000:]}"
        )
        assert " passed" in result.stdout and " failed" not in result.stdout

else:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gemma2_lite import get_config
    from gemma2_lite import sharding as sh
    from gemma2_lite.checkpoint import load_hf
    from gemma2_lite.memory import param_shard_elements, plan_memory

    # Dims: prime-ish where sharding allows; those split 2 ways are 2 x prime (V 202 = 2 x 101,
    # D 52 = 4 x 13 (HF wants N | D), F 94 = 2 x 47); N 4 and K 2 split over model = 2.
    HF = dict(
        vocab_size=202,
        hidden_size=52,
        intermediate_size=94,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=14,
        query_pre_attn_scalar=23,
        sliding_window=5,
        max_position_embeddings=64,
    )
    B, T = 4, 13

    def _leaves(state: nnx.State) -> dict:
        return {p: v.get_value() for p, v in nnx.to_flat_state(state)}

    @pytest.fixture(scope="module")
    def mesh():
        assert jax.device_count() == 8, "the child process must see 8 emulated devices"
        return sh.make_mesh({"data": 2, "fsdp": 2, "model": 2})

    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory):
        from hf_reference import make_hf_model, save_hf_model

        model = make_hf_model(**HF, seed=3)
        return model, save_hf_model(model, tmp_path_factory.mktemp("hf") / "tiny")

    @pytest.fixture(scope="module")
    def batch():
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, HF["vocab_size"], (B, T)).astype(np.int32)
        mask = np.ones((B, T), np.int32)
        mask[1, :4] = 0  # one left-padded row
        return tokens, mask

    @pytest.fixture(scope="module")
    def models(checkpoint, mesh):
        """(unsharded on device 0, sharded by load_hf(place=...)) copies of the same weights."""
        _, path = checkpoint
        return load_hf(path), sh.load_hf_sharded(path, mesh)

    # ------------------------------------------------------------------ meshes and rules
    def test_make_mesh_axes_and_rest() -> None:
        mesh = sh.make_mesh({"data": 2, "model": -1})
        assert mesh.axis_names == ("data", "fsdp", "model")
        assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
        assert dict(sh.make_mesh().shape) == {"data": 1, "fsdp": 8, "model": 1}

    @pytest.mark.parametrize(
        "shape, message",
        [
            ({"data": 3, "fsdp": 2}, "needs 6 devices but 8 are available"),
            ({"tensor": 8}, "unknown mesh axis"),
            ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
            ({"data": 3, "fsdp": -1}, "does not divide the 8 available"),
            ({"data": 0, "fsdp": 8}, "positive size"),
        ],
    )
    def test_make_mesh_errors(shape, message) -> None:
        with pytest.raises(sh.ShardingError, match=message):
            sh.make_mesh(shape)

    def test_rules_give_maxtext_specs() -> None:
        assert sh.logical_to_spec(("heads", "embed", "head_dim")) == P("model", "fsdp", None)
        assert sh.logical_to_spec(("vocab", "embed")) == P("model", "fsdp")
        assert sh.logical_to_spec(("norm",)) == P(None)
        over = {"embed": ("data", "fsdp"), "mlp": None}
        assert sh.logical_to_spec(("embed", "mlp"), over) == P(("data", "fsdp"), None)
        # one mesh axis splits only one dimension: the later one is replicated
        assert sh.logical_to_spec(("embed", "mlp"), {"embed": "model"}) == P("model", None)
        with pytest.raises(sh.ShardingError, match="unknown mesh axis"):
            sh.resolve_rules({"embed": "tensor"})

    def test_indivisible_dimension_names_param_dim_and_axis() -> None:
        cfg = get_config("tiny", num_heads=6, num_kv_heads=2, num_layers=2, vocab_size=256)
        mesh = sh.make_mesh({"fsdp": 2, "model": 4})
        abstract = nnx.eval_shape(lambda: sh.Gemma2(cfg, rngs=nnx.Rngs(0)))
        with pytest.raises(sh.ShardingError) as err:
            # (kv_heads kept whole: K=2 would fail first, on attn.k)
            sh.state_shardings(nnx.state(abstract), mesh, {"kv_heads": None})
        msg = str(err.value)
        # (attn.o, rows (D, N, H), comes before attn.q in the state's sorted order)
        assert re.match(
            r"layers\.0\.attn\.(o dim 1|q dim 0) \(heads=6\) is not divisible by mesh "
            r"axis 'model' \(4\)",
            msg,
        ), msg

    # ------------------------------------------------------------------ layouts
    def test_loaded_params_are_in_rule_layout(models, mesh) -> None:
        _, sharded = models
        for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
            arr = var.get_value()
            spec = sh.logical_to_spec(var.get_metadata()["logical_axes"])
            assert arr.sharding == NamedSharding(mesh, spec), path
            want = sh.shard_shape(arr.shape, spec, mesh)
            assert all(s.data.shape == want for s in arr.addressable_shards), path
            assert len(arr.addressable_shards) == 8
        q = sharded.layers[0].attn.q.get_value()  # (N, H, D) = (4, 14, 52)
        assert q.addressable_shards[0].data.shape == (2, 14, 26)
        emb = sharded.embedder.embedding.get_value()  # (V, D) = (202, 52)
        assert emb.addressable_shards[0].data.shape == (101, 26)

    def test_sharded_init_never_materialises_whole_weights(models, mesh) -> None:
        cfg = models[0].config
        graphdef, create = sh.make_sharded_init(cfg, mesh, seed=1)
        compiled = create.lower().compile()
        stats = compiled.memory_analysis()
        per_device, _ = param_shard_elements(cfg, mesh)
        total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(models[0], nnx.Param)))
        # Each device outputs exactly its shards (XLA adds an 8-byte pointer per output of the
        # result tuple), and its scratch space stays below one full copy of the weights.
        n_out = len(jax.tree.leaves(nnx.state(models[0], nnx.Param)))
        assert stats.output_size_in_bytes == 4 * per_device + 8 * n_out
        assert 4 * per_device < 4 * total / 3
        assert stats.temp_size_in_bytes < 4 * total
        model = nnx.merge(graphdef, compiled())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            spec = sh.logical_to_spec(var.get_metadata()["logical_axes"])
            assert var.get_value().sharding.spec == spec, path
        # a real initialisation: the sharded pieces form weights with the fan-in scale
        q = np.asarray(model.layers[1].attn.q.get_value())
        assert 0.5 < q.std() * np.sqrt(cfg.d_model) < 1.5

    def test_shard_model_places_an_unsharded_model(models, mesh) -> None:
        plain, _ = models
        g, state = nnx.split(plain)
        copy = nnx.merge(g, jax.tree.map(lambda x: x.copy(), state))
        assert sh.shard_model(copy, mesh) is copy
        assert copy.layers[0].mlp.gate.get_value().sharding.spec == P("model", "fsdp")
        np.testing.assert_array_equal(
            np.asarray(copy.layers[0].mlp.gate.get_value()),
            np.asarray(plain.layers[0].mlp.gate.get_value()),
        )

    # ------------------------------------------------------------------ forward
    def test_sharded_forward_equals_unsharded_and_hf(models, mesh, batch, checkpoint) -> None:
        from hf_reference import hf_logits
        from tolerance import assert_close

        plain, sharded = models
        tokens, mask = batch
        want = np.asarray(plain(jnp.asarray(tokens), jnp.asarray(mask)))
        got = sh.sharded_forward(sharded, tokens, mesh, mask)
        assert got.sharding.spec[0] in (("data", "fsdp"), "data")  # batch stays split
        assert_close(np.asarray(got), want, rel=1e-5, what="sharded vs one device")
        ref = hf_logits(checkpoint[0], tokens, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(got)[real], ref[real], atol=1e-4, rtol=0)

    def test_batch_not_divisible_is_a_clear_error(mesh) -> None:
        with pytest.raises(sh.ShardingError, match="batch of 6 is not divisible .*4 ways"):
            sh.shard_batch(np.zeros((6, 3), np.int32), mesh)

    # ------------------------------------------------------------------ training
    def test_sharded_train_step_equals_the_single_device_step(models, mesh, batch) -> None:
        """train.make_train_step, the one step: given train_shardings it runs on the mesh and
        gives the single-device step's losses and weights."""
        from gemma2_lite.train import TrainConfig, make_loss_fn, make_optimizer, make_train_step

        plain, sharded = models
        tokens, mask = batch
        windows = jnp.asarray(tokens)  # (B, T): inputs T - 1 long
        loss_mask = jnp.asarray(mask[:, 1:], jnp.float32)  # the loss skips the padding
        # eps well above float noise: Adam divides by |g|, so for a weight whose gradient is ~0
        # the update would be the sign of rounding noise, sharded or not.
        tc = TrainConfig(steps=10, lr=1e-3, warmup=0, eps=1e-6, weight_decay=0.1)
        tx, loss_fn = make_optimizer(tc), make_loss_fn(tc, False)
        copy = lambda m: nnx.split(
            nnx.merge(*nnx.split(m)[:1], jax.tree.map(jnp.copy, nnx.state(m))), nnx.Param, ...
        )
        g1, p1, r1 = copy(plain)
        g8, p8, r8 = copy(sharded)
        o1, o8 = tx.init(p1), sh.sharded_opt_init(tx, p8, mesh)
        shardings = sh.train_shardings(p8, o8, r8, mesh)

        # optimizer moments are sharded exactly like their parameters (ZeRO-3)
        layouts = {path: v.get_value().sharding for path, v in nnx.to_flat_state(p8)}
        moments = [
            (path, leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                o8, is_leaf=lambda x: isinstance(x, nnx.Variable)
            )[0]
            if isinstance(leaf, nnx.Variable)
        ]
        assert len(moments) == 2 * len(layouts)
        for path, v in moments:
            key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            match = [p for p in layouts if key[-len(p) :] == p]
            assert match and v.get_value().sharding.is_equivalent_to(
                layouts[match[0]], v.get_value().ndim
            ), path

        before = {p: np.asarray(v) for p, v in _leaves(p1).items()}
        step_1 = make_train_step(g1, tx, loss_fn)
        step_8 = make_train_step(g8, tx, loss_fn, shardings=shardings)
        # Two keys, not one placed twice: device_put may alias device 0's buffer, and each
        # step donates its key.
        rng_1 = jax.random.PRNGKey(0)
        rng_8 = jax.device_put(jax.random.PRNGKey(0), shardings.replicated)
        batch_8, mask_8 = sh.shard_batch(windows, mesh), sh.shard_batch(loss_mask, mesh)
        stats = step_8.lower(p8, o8, rng_8, r8, None, batch_8, mask_8).compile().memory_analysis()
        for _ in range(2):
            p1, o1, rng_1, m1 = step_1(p1, o1, rng_1, r1, None, windows, loss_mask)
            p8, o8, rng_8, m8 = step_8(p8, o8, rng_8, r8, None, batch_8, mask_8)
            np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
        a, b = _leaves(p1), _leaves(p8)
        moved = 0.0
        for path in a:
            np.testing.assert_allclose(
                np.asarray(b[path]), np.asarray(a[path]), atol=1e-5, err_msg=str(path)
            )
            assert b[path].sharding.is_equivalent_to(layouts[path], b[path].ndim), path
            moved = max(moved, float(np.abs(np.asarray(a[path]) - before[path]).max()))
        assert moved > 1e-3  # two steps of lr 1e-3 really moved the weights

        # XLA's own accounting of the step's inputs on one device equals the planner's
        # per-device parameters + AdamW state (moments and two step counters), plus the rng
        # key and this device's quarter of the (B, T) int32 windows and (B, T - 1) f32 mask.
        plan = plan_memory(sharded.config, mesh, batch=B, seq=T)
        batch_bytes = (B // 4) * T * 4 + (B // 4) * (T - 1) * 4
        assert stats.argument_size_in_bytes == plan.params + plan.optimizer + 8 + batch_bytes

    def test_train_on_a_mesh_equals_train_on_one_device(mesh) -> None:
        """train(..., mesh=mesh) runs the same loop with the sharded step: same losses."""
        from gemma2_lite import get_config
        from gemma2_lite.train import TrainConfig, train

        cfg = get_config(
            "tiny",
            vocab_size=64,
            d_model=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            ffn_dim=48,
            max_seq_len=32,
        )
        tokens = np.random.default_rng(1).integers(0, 64, 4000).astype(np.int32)
        tc = TrainConfig(
            steps=3, batch_size=8, seq_len=16, lr=3e-3, warmup=1, eps=1e-6, progress=False
        )
        model_1, hist_1 = train(cfg, tc, tokens)
        model_8, hist_8 = train(cfg, tc, tokens, mesh=mesh)
        losses = lambda h: [row["loss"] for row in h["train"]]
        np.testing.assert_allclose(losses(hist_8), losses(hist_1), rtol=1e-5)
        assert model_8.layers[0].mlp.gate.get_value().sharding.spec == P("model", "fsdp")

    # ------------------------------------------------------------------ multi-host guard
    def test_maybe_initialize_distributed_is_a_no_op_on_one_host() -> None:
        assert sh.maybe_initialize_distributed({}) is False
        assert sh.maybe_initialize_distributed({"TPU_WORKER_HOSTNAMES": "localhost"}) is False
        assert sh._multi_host_env({"TPU_WORKER_HOSTNAMES": "t1,t2"})
        assert sh._multi_host_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
        assert sh._multi_host_env({"SLURM_NTASKS": "4"})
        assert not sh._multi_host_env({"SLURM_NTASKS": "1"})
        assert jax.device_count() == 8  # nothing was re-initialised
