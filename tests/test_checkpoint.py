"""Checkpoint loaders and exporters: Hugging Face safetensors and the official Flax layout."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_reference import hf_logits

from gemma2_lite import Gemma2, get_config, params
from gemma2_lite.checkpoint import (
    CheckpointError,
    infer_flax_config,
    load_flax,
    load_hf,
    read_safetensors,
    save_flax,
    save_hf,
    to_arrays,
    to_flax_tree,
    write_safetensors,
)
from gemma2_lite.safetensors_io import mapping_of

CFG = get_config(
    "tiny",
    vocab_size=131,
    d_model=36,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=10,
    ffn_dim=58,
    query_pre_attn_scalar=19,
    sliding_window=5,
    max_seq_len=64,
)


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

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "c": np.arange(5, dtype=np.int64),
    }
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    np.testing.assert_array_equal(theirs["a"], tensors["a"])
    np.testing.assert_array_equal(theirs["c"], tensors["c"])
    safetensors.numpy.save_file(
        {"a": tensors["a"], "c": tensors["c"]}, tmp_path / "lib.safetensors"
    )
    back = read_safetensors(tmp_path / "lib.safetensors")
    np.testing.assert_array_equal(back["a"], tensors["a"])
    np.testing.assert_array_equal(
        read_safetensors(tmp_path / "ours.safetensors")["b"], tensors["b"]
    )


def test_mismatched_and_missing_tensors_are_named(model, tmp_path):
    save_hf(model, tmp_path)
    sd = read_safetensors(tmp_path / "model.safetensors")
    bad = {k: np.array(v) for k, v in sd.items()}
    bad["model.layers.1.mlp.down_proj.weight"] = np.zeros((36, 57), np.float32)
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(
        CheckpointError,
        match=r"layers\.1\.mlp\.down: expected shape \(36, 58\), "
        r"found \(36, 57\)",
    ):
        load_hf(tmp_path)
    del bad["model.layers.1.mlp.down_proj.weight"]
    del bad["model.norm.weight"]
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors: \['final_norm.scale', "
        r"'layers.1.mlp.down'\]",
    ):
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
    with pytest.raises(
        CheckpointError,
        match=r"k_proj.weight: expected shape \(30, 36\), "
        r"found \(20, 36\)",
    ):
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
    flat = {
        "transformer/embedder": {
            "input_embedding": np.concatenate(
                [t["embedder"]["input_embedding"], np.ones((7, 36), np.float32)]
            )
        },
        "transformer/final_norm": t["final_norm"],
    }
    for i in range(3):
        layer = t[f"layer_{i}"]
        for sub, value in layer.items():
            if sub == "mlp":
                value = {
                    "gating_einsum": value["gating_einsum"].transpose(0, 2, 1),
                    "linear": value["linear"],
                }
            for name, leaf in value.items():
                flat[f"transformer/layer_{i}/{sub}/{name}"] = leaf
    assert_same_params(model, load_flax(flat, config=CFG))
    flat["transformer/layer_2/mlp/linear"] = np.zeros((36, 58), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.down: expected shape \(36, 58\)"):
        load_flax(flat, config=CFG)


def test_flax_config_is_inferred_from_shapes():
    def fake(name):
        c = get_config(name)
        arrays = {
            "transformer/embedder/input_embedding": SimpleNamespace(shape=(256128, c.d_model))
        }
        arrays.update({f"transformer/layer_{i}/attn/q_einsum/w": None for i in range(c.num_layers)})
        return arrays

    c27 = infer_flax_config(fake("gemma2-27b"))
    assert c27.query_pre_attn_scalar == 144 and c27.head_dim == 128
    assert infer_flax_config(fake("gemma2-2b")).num_layers == 26


# ----------------------------------------------------------------------------- values
def _with_tensor(folder, name, edit):
    """Rewrite the single-file checkpoint in ``folder`` with ``edit`` applied to ``name``."""
    sd = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    edit(sd[name])
    write_safetensors(folder / "model.safetensors", sd)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weights_are_refused_naming_tensor_and_file(model, tmp_path, bad):
    save_hf(model, tmp_path)
    _with_tensor(
        tmp_path,
        "model.layers.1.post_feedforward_layernorm.weight",
        lambda w: w.__setitem__(5, bad),
    )
    with pytest.raises(
        CheckpointError,
        match=r"layers\.1\.post_ffw_norm\.scale \(model\.layers"
        r"\.1\.post_feedforward_layernorm\.weight in .*model\.safetensors\): 1 "
        r"value\(s\) are not finite \(first: -?(inf|nan) at flat index 5\)",
    ):
        load_hf(tmp_path)
    # Skipping the value check (a file one trusts) skips that and nothing else.
    unchecked = load_hf(tmp_path, check_values=False)
    norm = np.asarray(unchecked.layers[1].post_ffw_norm.scale[...])
    assert not np.isfinite(norm[5]) and np.isfinite(np.delete(norm, 5)).all()
    sd = dict(read_safetensors(tmp_path / "model.safetensors"))
    del sd["model.norm.weight"]
    write_safetensors(tmp_path / "model.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"final_norm\.scale"):
        load_hf(tmp_path, check_values=False)


def test_values_past_float16_are_refused_only_for_float16(model, tmp_path):
    save_hf(model, tmp_path)
    _with_tensor(
        tmp_path, "model.layers.0.mlp.up_proj.weight", lambda w: w.__setitem__((3, 4), 7e4)
    )
    for dtype in (jnp.float32, jnp.bfloat16):
        load_hf(tmp_path, dtype)  # representable: loads
    with pytest.raises(
        CheckpointError,
        match=r"layers\.0\.mlp\.up .*(beyond float16's range|"
        r"not finite)",
    ):
        load_hf(tmp_path, jnp.float16)
    with pytest.raises(
        CheckpointError,
        match=r"beyond float16's range \(\+-65504\) and the "
        r"model computes in float16",
    ):
        load_hf(tmp_path, jnp.float16, param_dtype=jnp.float32)


def test_values_are_checked_block_by_block(monkeypatch):
    """A bad value past the first block is found, at its index in the whole tensor."""
    monkeypatch.setattr(params, "_CHUNK_BYTES", 64)
    w = np.ones((40, 6), ml_dtypes.bfloat16)
    w[33, 2] = np.inf
    with pytest.raises(
        CheckpointError,
        match=r"x: 1 value\(s\) are not finite \(first: inf at "
        r"flat index 200\)",
    ):
        params.host_param(w, ml_dtypes.bfloat16, "x")
    w[33, 2] = 1.0
    np.testing.assert_array_equal(params.host_param(w.T, np.float32, "x"), w.T.astype(np.float32))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
def test_the_bit_scan_finds_exactly_the_values_that_are_not_finite(dtype, monkeypatch):
    """The scan reads raw bits (two maxima per block): every NaN (any sign, any payload) and
    infinity is found, in any block, and nothing finite is ever taken for one: the largest
    finite values, both zeros, the smallest subnormals."""
    monkeypatch.setattr(params, "_SCAN_BYTES", 32)
    dtype = np.dtype(dtype)
    info = ml_dtypes.finfo(dtype)
    finite = np.array(
        [info.max, -info.max, 0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, 1.5],
        dtype,
    )
    base = np.resize(finite, 301)  # several blocks of 32 bytes
    assert not params._any_not_finite(base)
    unsigned = params._EXPONENT[dtype][0]
    top = int(np.iinfo(unsigned).max)
    bits = base.view(unsigned)
    nans = [
        np.array([np.nan, -np.nan], dtype).view(unsigned).tolist(),
        [top >> 1, top],  # every mantissa bit set, both signs
    ]
    for bad in [np.inf, -np.inf, *[b for pair in nans for b in pair]]:
        for at in (0, 150, 300):
            trial = bits.copy()
            if isinstance(bad, float):
                trial.view(dtype)[at] = bad
            else:
                trial[at] = bad
            assert params._any_not_finite(trial.view(dtype)), (dtype, bad, at)
            assert not np.isfinite(trial.view(dtype).astype(np.float64)).all()


def test_load_uses_the_files_pages_in_place(model, tmp_path):
    """A tensor already in our layout and dtype (the embedding, the norms) is not copied: the
    parameter's buffer is the file's memory map. Others are converted once."""
    save_hf(model, tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    assert params.host_param(emb, np.float32, "emb") is emb  # in place: no copy
    q = tensors["model.layers.0.self_attn.q_proj.weight"].reshape(6, 10, 36).transpose(0, 2, 1)
    copy = params.host_param(q, np.float32, "q")
    assert copy.flags.c_contiguous and not np.shares_memory(copy, q)
    own = np.ones(64, np.float32)  # a caller's array: copied
    assert not np.shares_memory(params.host_param(own, np.float32, "own"), own)
    assert mapping_of(emb) is not None and mapping_of(copy) is None
    loaded = load_hf(tmp_path)
    assert_same_params(model, loaded)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: which mapping holds the parameter's buffer?
        pointer = loaded.embedder.embedding.get_value().unsafe_buffer_pointer()
        holder = next(
            line
            for line in maps.read_text().splitlines()
            if int(line.split("-")[0], 16) <= pointer < int(line.split()[0].split("-")[1], 16)
        )
        assert holder.endswith(str(tmp_path / "model.safetensors")), holder


# ----------------------------------------------------------------------------- saving
def other_model(seed=7, config=CFG):
    from random_models import random_model

    return random_model(config, seed=seed)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def hidden_siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fail_at", ["after config.json", "after one shard", "after every shard"])
def test_an_interrupted_save_leaves_the_previous_model(model, tmp_path, monkeypatch, fail_at):
    from gemma2_lite import hf_checkpoint

    folder = tmp_path / "ckpt"
    save_hf(model, folder, max_shard_bytes=20_000)
    (folder / "tokenizer.model").write_bytes(b"tok")
    before = listing(folder)
    writes = []

    def failing(path, tensors, **kw):
        if fail_at == "after config.json" or (fail_at == "after one shard" and writes):
            raise OSError(28, "No space left on device")
        writes.append(path)
        return write_safetensors(path, tensors, **kw)

    monkeypatch.setattr(hf_checkpoint, "write_safetensors", failing)
    if fail_at == "after every shard":
        monkeypatch.setattr(
            hf_checkpoint, "fsync_dir", lambda p: (_ for _ in ()).throw(OSError(5, "I/O error"))
        )
    with pytest.raises(OSError):
        save_hf(other_model(), folder, max_shard_bytes=20_000)
    assert listing(folder) == before and hidden_siblings(folder) == []
    assert_same_params(model, load_hf(folder))


def test_a_killed_save_leaves_one_whole_model(model, tmp_path):
    """A process saving two models in turn is killed mid-save, whenever its new folder is half
    written: the folder holds one of the two models, whole; the next save clears the leftovers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "ckpt"
    save_hf(model, folder, max_shard_bytes=20_000)
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_checkpoint import other_model\n"
        "from gemma2_lite.checkpoint import save_hf\n"
        "a, b = other_model(3), other_model(7)\n"
        "while True:\n"
        "    for m in (a, b):\n"
        f"        save_hf(m, {str(folder)!r}, max_shard_bytes=2_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 300
        while not any(
            ".saving-" in n and listing(folder.parent / n) for n in hidden_siblings(folder)
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "the saver never saved"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    loaded = to_arrays(load_hf(folder))
    whole = [
        m
        for m in (model, other_model(3), other_model(7))
        if all(np.array_equal(v, loaded[k]) for k, v in to_arrays(m).items())
    ]
    assert len(whole) == 1
    save_hf(model, folder)
    assert hidden_siblings(folder) == []


def test_a_save_never_replaces_a_model_it_did_not_write(model, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    save_hf(other_model(), tmp_path / "elsewhere")
    for name in ("config.json", "model.safetensors"):  # as a download has them: no manifest
        (folder / name).write_bytes((tmp_path / "elsewhere" / name).read_bytes())
    (folder / "tokenizer.model").write_bytes(b"tok")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(
        CheckpointError,
        match=r"holds a model that save_hf did not write "
        r".*overwrite=True",
    ):
        save_hf(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    save_hf(model, folder, overwrite=True)  # told to: replaced
    assert_same_params(model, load_hf(folder))
    assert (folder / "tokenizer.model").read_bytes() == b"tok"  # other files carried over


def test_a_save_never_replaces_a_different_model(model, tmp_path):
    save_hf(model, tmp_path)
    wider = other_model(config=CFG.replace(ffn_dim=60))
    with pytest.raises(
        CheckpointError,
        match=r"holds a different model .*'ffn_dim': 58.*"
        r"'ffn_dim': 60.*overwrite=True",
    ):
        save_hf(wider, tmp_path)
    assert_same_params(model, load_hf(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"changed")  # ours, but changed since
    with pytest.raises(
        CheckpointError,
        match=r"has changed since save_hf wrote it "
        r"\(model.safetensors has 7 bytes",
    ):
        save_hf(model, tmp_path)
    save_hf(wider, tmp_path, overwrite=True)
    assert_same_params(wider, load_hf(tmp_path))


def test_a_save_through_a_link_keeps_the_link(model, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    save_hf(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert_same_params(model, load_hf(tmp_path / "real"))
