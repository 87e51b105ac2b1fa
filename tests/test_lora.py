"""gemma2_lite.lora: adapters that start as the identity, train alone through the one trainer,
merge into a plain Gemma2 with the same logits, and travel in Hugging Face PEFT's layout."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_models import random_model
from tolerance import assert_close

from gemma2_lite import get_config
from gemma2_lite.checkpoint import (
    CheckpointError,
    from_arrays,
    hf_state_dict,
    hf_to_arrays,
    save_hf,
    write_safetensors,
)
from gemma2_lite.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TARGETS,
    Dequantized,
    LoRAWeight,
    adapter_state_dict,
    apply_lora,
    count_lora_params,
    load_adapters,
    lora_state,
    merge,
    save_adapters,
)
from gemma2_lite.model import Gemma2
from gemma2_lite.quantize import Int8Scale, Int8Values, quantize, weight_bytes
from gemma2_lite.sampler import generate
from gemma2_lite.train import TrainConfig, make_loss_fn, make_optimizer, make_train_step, train

CFG = get_config(
    "tiny",
    vocab_size=131,
    d_model=36,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=10,
    ffn_dim=58,
    query_pre_attn_scalar=19,
    sliding_window=5,
    max_seq_len=64,
    name="small",
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 131, (2, 13)), jnp.int32)
ALL = tuple(TARGETS)


@pytest.fixture(scope="module")
def base() -> Gemma2:
    return random_model(CFG, seed=1)


def trained_looking(model: Gemma2, seed: int = 0, size: float = 0.3) -> Gemma2:
    """Random B (and A) so the adapters change the logits, as after training."""
    rng = np.random.default_rng(seed)
    for _path, var in nnx.to_flat_state(lora_state(model)):
        var[...] = jnp.asarray(size * rng.standard_normal(var.shape), jnp.float32)
    return model


def test_adapters_start_as_the_identity_and_leave_the_base_alone(base) -> None:
    model = apply_lora(base, 4, 8.0, ALL, nnx.Rngs(0))
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))  # B = 0: exactly the base
    assert all(
        type(getattr(getattr(b, m), n)) is nnx.Param
        for b in base.layers
        for n, (m, _) in TARGETS.items()
    )
    c, r = CFG, 4
    per_layer = r * (
        (c.d_model + c.num_heads * c.head_dim) * 2  # q, o
        + (c.d_model + c.num_kv_heads * c.head_dim) * 2  # k, v
        + (c.d_model + c.ffn_dim) * 3
    )  # gate, up, down
    assert count_lora_params(model) == c.num_layers * per_layer
    only_qv = apply_lora(base, 2, 4.0, ("q_proj", "v"), nnx.Rngs(0))  # HF names accepted
    assert count_lora_params(only_qv) == c.num_layers * 2 * (
        2 * c.d_model + c.num_heads * c.head_dim + c.num_kv_heads * c.head_dim
    )
    assert isinstance(only_qv.layers[1].attn.v, LoRAWeight)
    assert type(only_qv.layers[1].attn.k) is nnx.Param


def test_merged_logits_equal_unmerged_and_an_independent_sum(base) -> None:
    model = trained_looking(apply_lora(base, 3, 6.0, ALL, nnx.Rngs(2)), seed=1)
    unmerged = np.asarray(model(TOKENS))
    assert np.abs(unmerged - np.asarray(base(TOKENS))).max() > 0.1  # the adapters matter
    merged = merge(model)
    assert type(merged) is Gemma2 and count_lora_params(merged) == 0
    assert_close(merged(TOKENS), unmerged, 1e-5, "merged vs unmerged")
    # Independently: W' = W + (alpha / r) B_peft @ A_peft on Hugging Face's (out, in) matrices.
    sd = hf_state_dict(base)
    for key, a in adapter_state_dict(model).items():
        if key.endswith("lora_A.weight"):
            b = adapter_state_dict(model)[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").replace(".lora_A", "")
            sd[name] = sd[name] + (6.0 / 3) * b @ a
    reference = from_arrays(CFG, hf_to_arrays(CFG, sd))
    assert_close(reference(TOKENS), unmerged, 1e-5, "W + scale B A in HF's layout")


def test_only_the_adapters_train_through_the_one_trainer(base) -> None:
    model = apply_lora(base, 4, 8.0, ("q", "v", "down"), nnx.Rngs(0))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    tc = TrainConfig(steps=6, batch_size=2, seq_len=12, lr=1e-2, warmup=1, progress=False)
    tx = make_optimizer(tc)
    step = make_train_step(graphdef, tx, make_loss_fn(tc, has_teacher=False))
    before_rest = jax.tree.map(np.asarray, rest)
    params, opt, rng = jax.tree.map(jnp.array, adapters), tx.init(adapters), jax.random.key(0)
    assert {
        type(v) for v in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))
    } == {nnx.LoRAParam}
    losses = []
    for _ in range(6):
        params, opt, rng, m = step(params, opt, rng, rest, None, TOKENS, None)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(before_rest), jax.tree.leaves(rest)):
        np.testing.assert_array_equal(a, b)  # the base never moved
    moved = [
        float(jnp.abs(x).max()) for path, x in nnx.to_flat_state(params) if path[-1] == "lora_b"
    ]
    assert min(moved) > 0  # every B left zero


def peft_names(config, rank: int, targets) -> dict[str, tuple[int, int]]:
    """PEFT's documented layout for Gemma2ForCausalLM, written out by hand: key -> shape."""
    c = config
    sizes = {
        "q_proj": (c.d_model, c.num_heads * c.head_dim),
        "k_proj": (c.d_model, c.num_kv_heads * c.head_dim),
        "v_proj": (c.d_model, c.num_kv_heads * c.head_dim),
        "o_proj": (c.num_heads * c.head_dim, c.d_model),
        "gate_proj": (c.d_model, c.ffn_dim),
        "up_proj": (c.d_model, c.ffn_dim),
        "down_proj": (c.ffn_dim, c.d_model),
    }
    out = {}
    for i in range(c.num_layers):
        for t in targets:
            where = "self_attn" if t[0] in "qkvo" else "mlp"
            key = f"base_model.model.model.layers.{i}.{where}.{t}"
            d_in, d_out = sizes[t]
            out[f"{key}.lora_A.weight"] = (rank, d_in)
            out[f"{key}.lora_B.weight"] = (d_out, rank)
    return out


def test_saved_adapters_follow_the_peft_layout_and_round_trip(base, tmp_path) -> None:
    model = trained_looking(apply_lora(base, 3, 6.0, ("q", "o", "up", "down"), nnx.Rngs(0)))
    save_adapters(model, tmp_path, base_model_name_or_path="google/gemma-2-2b-it")
    from gemma2_lite.checkpoint import read_safetensors

    tensors = read_safetensors(tmp_path / ADAPTER_WEIGHTS)
    want = peft_names(CFG, 3, ["q_proj", "o_proj", "up_proj", "down_proj"])
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6.0
    assert config["target_modules"] == ["q_proj", "o_proj", "up_proj", "down_proj"]
    assert config["base_model_name_or_path"] == "google/gemma-2-2b-it"
    loaded = load_adapters(base, tmp_path)
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))
    for (pa, va), (pb, vb) in zip(
        nnx.to_flat_state(lora_state(loaded)), nnx.to_flat_state(lora_state(model))
    ):
        assert pa == pb
        np.testing.assert_array_equal(va[...], vb[...])


def test_peft_reads_our_adapters_and_we_read_peft(base, tmp_path) -> None:
    """With peft installed: PeftModel.from_pretrained gives our logits, and back."""
    peft = pytest.importorskip("peft")
    import torch
    from hf_reference import hf_logits
    from transformers import Gemma2ForCausalLM

    model = trained_looking(
        apply_lora(base, 2, 5.0, ALL, nnx.Rngs(0), trainable_tokens=(3, 100)), size=0.2
    )
    save_hf(base, tmp_path / "base")
    save_adapters(model, tmp_path / "ours")
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    assert_close(hf_logits(theirs, np.asarray(TOKENS)), model(TOKENS), 1e-4, "peft vs ours")
    # PEFT's own adapters (random B, as if trained) into ours.
    hf2 = Gemma2ForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    cfg = peft.LoraConfig(
        r=3,
        lora_alpha=7,
        target_modules=["k_proj", "gate_proj"],
        init_lora_weights=False,
        trainable_token_indices=[5, 7],
    )
    pm = peft.get_peft_model(hf2, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape))  # the new rows move
    pm.save_pretrained(tmp_path / "theirs")
    ours = load_adapters(base, tmp_path / "theirs")
    with torch.no_grad():
        assert_close(ours(TOKENS), hf_logits(pm, np.asarray(TOKENS)), 1e-4, "ours vs peft")


def test_qlora_trains_over_the_int8_base_through_the_trainer(base) -> None:
    """The QLoRA seam: adapters over gemma2_lite.quantize's int8 model train through
    train(..., trainable=nnx.LoRAParam); the base stays int8 and unchanged and keeps about a
    quarter of float32's bytes; merge keeps the logits."""
    small = quantize(base, "int8")
    model = apply_lora(small, 4, 8.0, ALL, nnx.Rngs(0))
    assert isinstance(model.layers[0].attn.q.base, Dequantized)
    assert_close(model(TOKENS), small(TOKENS), 1e-5, "QLoRA at init vs the int8 model")
    tokens = np.tile(np.arange(3, 40), 40)  # a cycle: learnable in a few steps
    tc = TrainConfig(steps=12, batch_size=2, seq_len=12, lr=3e-2, warmup=0, progress=False)
    trained, history = train(CFG, tc, tokens, model=model, trainable=nnx.LoRAParam)
    losses = [row["loss"] for row in history["train"]]
    assert losses[-1] < 0.8 * losses[0], losses
    before = jax.tree.leaves(nnx.state(small, (Int8Values, Int8Scale)))
    after = jax.tree.leaves(nnx.state(trained, (Int8Values, Int8Scale)))
    assert len(after) == len(before) > 0
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.dtype in (jnp.int8, jnp.float32)
        np.testing.assert_array_equal(a, b)  # the int8 base never moved
    assert any(x.dtype == jnp.int8 for x in after)
    assert all(
        isinstance(getattr(getattr(b, m), n), LoRAWeight)
        for b in trained.layers
        for n, (m, _) in TARGETS.items()
    )
    frozen = weight_bytes(trained) - 4 * count_lora_params(trained)
    assert frozen < 0.35 * weight_bytes(base)  # int8 + scales vs float32
    assert (
        min(
            float(jnp.abs(x).max())
            for p, x in nnx.to_flat_state(lora_state(trained))
            if p[-1] == "lora_b"
        )
        > 0
    )
    assert_close(merge(trained)(TOKENS), trained(TOKENS), 1e-5, "merged over an int8 base")


def test_generate_serves_an_adapted_model_as_its_merge(base) -> None:
    model = trained_looking(apply_lora(base, 4, 8.0, ALL, nnx.Rngs(0), trainable_tokens=(5, 6)))
    prompts = [[2, 17, 40, 9], [2, 88]]
    got = generate(model, prompts, max_new_tokens=3)
    merged = merge(model)
    assert got == generate(merged, prompts, max_new_tokens=3)
    moved = [
        np.abs(np.asarray(m.attn.q[...]) - np.asarray(b.attn.q[...])).max()
        for m, b in zip(merged.layers, base.layers)
    ]
    assert min(moved) > 1e-3  # the adapters are used


def test_bad_adapters_and_arguments_are_named(base, tmp_path) -> None:
    with pytest.raises(ValueError, match="rank must be"):
        apply_lora(base, 0, 8.0, ALL, nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown LoRA target 'wq'"):
        apply_lora(base, 2, 8.0, ("wq",), nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds"):
        apply_lora(base, 37, 8.0, ("q",), nnx.Rngs(0))
    model = apply_lora(base, 2, 4.0, ("q", "v"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, 2, 4.0, ("k",), nnx.Rngs(0))
    save_adapters(model, tmp_path)
    with pytest.raises(CheckpointError, match="missing"):  # a 3-layer base
        load_adapters(random_model(CFG.replace(num_layers=3), 0), tmp_path)
    tensors = adapter_state_dict(model)
    key = next(iter(tensors))
    tensors[key] = tensors[key][:, :-1]
    write_safetensors(tmp_path / ADAPTER_WEIGHTS, tensors)
    with pytest.raises(CheckpointError, match="expected shape"):
        load_adapters(base, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    for change, match in (
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": 0}, "r must be"),
        ({"use_dora": True}, "use_dora"),
        ({"target_modules": ["lm_head"]}, "unknown LoRA target"),
    ):
        (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_adapters(base, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(base, tmp_path / "nowhere")


def test_memory_planner_counts_the_adapters_and_what_fits(base) -> None:
    from gemma2_lite.memory import GiB, lora_param_count, plan_lora, plan_memory

    for targets in (ALL, ("q", "v"), ("o", "down")):
        model = apply_lora(base, 3, 6.0, targets, nnx.Rngs(0))
        assert lora_param_count(CFG, 3, targets) == count_lora_params(model)
    kw = dict(batch=1, seq=1024, chip="tpu-v5e", param_dtype="bfloat16", act_dtype="bfloat16")
    full = plan_memory("gemma2-2b", {}, **kw)
    lora = plan_lora("gemma2-2b", rank=8, **kw)
    qlora = plan_lora("gemma2-2b", rank=8, base_bytes=1, **kw)
    weights = 590_118_912 + 2_024_517_888
    adapters = lora_param_count("gemma2-2b", 8)
    assert lora.state == 2 * weights + 16 * adapters + 8  # base bf16; fp32 adapters + Adam
    assert qlora.state == weights + 16 * adapters + 8  # an int8 base
    assert lora.activations_remat == full.activations_remat
    assert not full.fits() and lora.fits() and full.state > 6 * lora.state
    assert not plan_lora("gemma2-9b", rank=8, **kw).fits()  # 9B needs the int8 base
    assert plan_lora("gemma2-9b", rank=8, base_bytes=1, **kw).fits()
    assert lora.train_remat < 16 * GiB


def test_trainable_token_rows_start_unchanged_and_change_how_a_token_is_written(
    base, tmp_path
) -> None:
    """LoRA alone cannot move a token's tied embedding row; trainable_tokens can."""
    model = apply_lora(base, 2, 4.0, ("q",), nnx.Rngs(0), trainable_tokens=(7, 3))
    np.testing.assert_array_equal(model(TOKENS), base(TOKENS))
    table = model.embedder.embedding
    assert table.ids == (3, 7) and table.rows.shape == (2, CFG.d_model)
    assert (
        count_lora_params(model)
        == count_lora_params(apply_lora(base, 2, 4.0, ("q",), nnx.Rngs(0))) + 2 * CFG.d_model
    )
    table.rows[...] = table.rows[...] + 1.0
    out = np.asarray(model(TOKENS))
    ref = np.asarray(base(TOKENS))
    changed = np.abs(out - ref).max(axis=(0, 1))  # (V,) per output token
    assert changed[3] > 1e-3 and changed[7] > 1e-3  # their logits move ...
    merged = merge(model)
    assert type(merged.embedder.embedding) is nnx.Param
    assert_close(merged(TOKENS), out, 1e-5, "merged rows")
    save_adapters(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["trainable_token_indices"] == [3, 7]
    from gemma2_lite.checkpoint import read_safetensors

    rows = read_safetensors(tmp_path / ADAPTER_WEIGHTS)[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    assert rows.shape == (2, CFG.d_model)
    np.testing.assert_array_equal(load_adapters(base, tmp_path)(TOKENS), out)
    with pytest.raises(ValueError, match="trainable_tokens"):
        apply_lora(base, 2, 4.0, ("q",), nnx.Rngs(0), trainable_tokens=(CFG.vocab_size,))
