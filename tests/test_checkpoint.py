"""Checkpoint loaders and exporters: Hugging Face safetensors and the official Flax layout."""

import json
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gemma2_lite import Gemma2, get_config
from gemma2_lite.checkpoint import (CheckpointError, infer_flax_config, load_flax, load_hf,
                                    read_safetensors, save_flax, save_hf, to_arrays,
                                    to_flax_tree, write_safetensors)
from hf_reference import hf_logits

CFG = get_config("tiny", vocab_size=131, d_model=36, num_layers=3, num_heads=6, num_kv_heads=2,
                 head_dim=10, ffn_dim=58, query_pre_attn_scalar=19, sliding_window=5,
                 max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    m = Gemma2(CFG, rngs=nnx.Rngs(3))
    # Non-zero norm scales so a lost or doubled (1 + w) would show.
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if path[-1] == "scale":
            var.set_value(jnp.linspace(-0.5, 0.5, var.shape[0]))
    return m


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 131, (2, 13)))


def assert_same_params(a, b):
    pa, pb = to_arrays(a), to_arrays(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


def test_hf_round_trip_is_exact(model, tmp_path):
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["query_pre_attn_scalar"] == 19
    loaded = load_hf(tmp_path)
    assert loaded.config.replace(name=CFG.name) == CFG
    assert_same_params(model, loaded)


def test_sharded_hf_checkpoint_with_index(model, tmp_path):
    save_hf(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_params(model, load_hf(tmp_path))


def test_transformers_reads_our_export(model, tmp_path):
    """Our exported checkpoint, loaded by transformers, gives our logits."""
    from transformers import Gemma2ForCausalLM

    save_hf(model, tmp_path)
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(hf, np.asarray(TOKENS)), model(TOKENS), atol=1e-4)


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    import safetensors.numpy

    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
               "c": np.arange(5, dtype=np.int64)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    np.testing.assert_array_equal(theirs["a"], tensors["a"])
    np.testing.assert_array_equal(theirs["c"], tensors["c"])
    safetensors.numpy.save_file({"a": tensors["a"], "c": tensors["c"]}, tmp_path / "lib.safetensors")
    back = read_safetensors(tmp_path / "lib.safetensors")
    np.testing.assert_array_equal(back["a"], tensors["a"])
    np.testing.assert_array_equal(read_safetensors(tmp_path / "ours.safetensors")["b"], tensors["b"])


def test_mismatched_and_missing_tensors_are_named(model, tmp_path):
    save_hf(model, tmp_path)
    sd = read_safetensors(tmp_path / "model.safetensors")
    bad = {k: np.array(v) for k, v in sd.items()}
    bad["model.layers.1.mlp.down_proj.weight"] = np.zeros((36, 57), np.float32)
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down: expected shape \(58, 36\), "
                                              r"found \(57, 36\)"):
        load_hf(tmp_path)
    del bad["model.layers.1.mlp.down_proj.weight"]
    del bad["model.norm.weight"]
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['final_norm.scale', "
                                              r"'layers.1.mlp.down'\]"):
        load_hf(tmp_path)
    bad["model.norm.weight"] = sd["model.norm.weight"]
    bad["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"]
    bad["model.layers.0.self_attn.q_proj.bias"] = np.zeros(60, np.float32)
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(CheckpointError, match="unexpected tensors.*q_proj.bias"):
        load_hf(tmp_path)


def test_config_mismatch_and_pickles_are_refused(model, tmp_path):
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"k_proj.weight: expected shape \(30, 36\), "
                                              r"found \(20, 36\)"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path / "nowhere")


def test_flax_orbax_round_trip(model, tmp_path):
    save_flax(model, tmp_path / "ckpt")
    loaded = load_flax(tmp_path / "ckpt", config=CFG)
    assert_same_params(model, loaded)


def test_flax_layouts_official_quirks(model):
    tree = to_flax_tree(model)
    t = tree["transformer"]
    assert t["layer_0"]["attn"]["kv_einsum"]["w"].shape == (2, 2, 36, 10)
    assert t["layer_0"]["mlp"]["gating_einsum"].shape == (2, 58, 36)
    # The official files use flat 'transformer/layer_i/...' keys; the 2B stores gating as (2, D, F);
    # the embedding has 128 extra rows (256128 vs 256000): all must load to the same model.
    flat = {"transformer/embedder": {"input_embedding": np.concatenate(
                [t["embedder"]["input_embedding"], np.ones((7, 36), np.float32)])},
            "transformer/final_norm": t["final_norm"]}
    for i in range(3):
        layer = t[f"layer_{i}"]
        for sub, value in layer.items():
            if sub == "mlp":
                value = {"gating_einsum": value["gating_einsum"].transpose(0, 2, 1),
                         "linear": value["linear"]}
            for name, leaf in value.items():
                flat[f"transformer/layer_{i}/{sub}/{name}"] = leaf
    assert_same_params(model, load_flax(flat, config=CFG))
    flat["transformer/layer_2/mlp/linear"] = np.zeros((36, 58), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.down: expected shape \(58, 36\)"):
        load_flax(flat, config=CFG)


def test_flax_config_is_inferred_from_shapes():
    def fake(name):
        c = get_config(name)
        arrays = {"transformer/embedder/input_embedding": SimpleNamespace(shape=(256128, c.d_model))}
        arrays.update({f"transformer/layer_{i}/attn/q_einsum/w": None for i in range(c.num_layers)})
        return arrays

    c27 = infer_flax_config(fake("gemma2-27b"))
    assert c27.query_pre_attn_scalar == 144 and c27.head_dim == 128
    assert infer_flax_config(fake("gemma2-2b")).num_layers == 26
