"""The checkpoints as Gemma 2 was released: raw Orbax trees, sharded bf16 HF folders, tokenizer.

The Flax loader is checked against an independent reading of the official tree: the tensors go
to transformers' Gemma2ForCausalLM through a conversion written here from the rules of the
official Orbax -> Hugging Face converter (transformers' ``convert_gemma3_weights_orbax_to_hf``,
whose attention and MLP blocks are Gemma 2's; Gemma 2's own ``convert_gemma2_weights_to_hf``
reads the PyTorch release, whose q/k/v are already (N*H, D)), never through our writer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_reference import hf_logits
from tolerance import assert_close

from gemma2_lite.book.fixtures import main
from gemma2_lite.chat import ChatSession
from gemma2_lite.checkpoint import config_from_hf, load_flax, load_hf, read_safetensors, to_arrays
from gemma2_lite.config import Gemma2Config
from gemma2_lite.fixtures import (
    FIXTURE_NAMES,
    FLAX_EXTRA_ROWS,
    TOKENIZER_VOCAB,
    fixture_config,
    write_fixtures,
)
from gemma2_lite.tokenizer import Tokenizer
from gemma2_lite.weights import model_dir

REL = 2e-5  # float32 on both sides: rounding is ~1e-6 of the largest logit, a bug ~1e-1
D = 48  # fixture_config's d_model, written out: the independent conversion must not ask us
NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The fixtures, written by the command line entry point."""
    out = tmp_path_factory.mktemp("release")
    assert main([str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- independent side
def official_to_hf(raw: Mapping[str, Mapping[str, np.ndarray]], hidden: int, vocab: int):
    """A torch state dict from a released (flat, raw) Orbax tree, by the official converter's
    rules: q (N, D, H) -> (N*H, D); kv (2, K, D, H) -> k, v (K*H, D); attn_vec (N, H, D) ->
    (D, N*H); gating [0] gate, [1] up, each (F, D) (transposed first where stored (D, F), as in
    the 2B); linear (F, D) -> (D, F); norm scales as they are; the embedding cut to ``vocab``."""
    import torch

    sd = {}
    for module, params in raw.items():
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        if module == "transformer/embedder":
            sd["model.embed_tokens.weight"] = params["input_embedding"][:vocab]
            continue
        if module == "transformer/final_norm":
            sd["model.norm.weight"] = params["scale"]
            continue
        i, sub = re.fullmatch(r"transformer/layer_(\d+)/(.+)", module).groups()
        base = f"model.layers.{i}."
        w = params.get("w")
        if sub == "attn/q_einsum":
            sd[base + "self_attn.q_proj.weight"] = w.transpose(0, 2, 1).reshape(-1, hidden)
        elif sub == "attn/kv_einsum":
            for name, part in zip("kv", w):
                sd[base + f"self_attn.{name}_proj.weight"] = part.transpose(0, 2, 1).reshape(
                    -1, hidden
                )
        elif sub == "attn/attn_vec_einsum":
            sd[base + "self_attn.o_proj.weight"] = w.transpose(2, 0, 1).reshape(hidden, -1)
        elif sub == "mlp/gating_einsum":
            gate, up = w.transpose(0, 2, 1) if w.shape[1] == hidden else w
            sd[base + "mlp.gate_proj.weight"], sd[base + "mlp.up_proj.weight"] = gate, up
        elif sub == "mlp/linear":
            sd[base + "mlp.down_proj.weight"] = w.T
        else:
            sd[base + NORMS[sub] + ".weight"] = params["scale"]
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def hf_from_official(raw, hf_config):
    """transformers' model holding the official tree's weights (float32, eager attention)."""
    import torch
    from transformers import Gemma2ForCausalLM

    hf_config._attn_implementation = "eager"
    model = Gemma2ForCausalLM(hf_config).eval().to(torch.float32)
    sd = official_to_hf(raw, hf_config.hidden_size, hf_config.vocab_size)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: set with the embedding
    assert not unexpected and not missing, (missing, unexpected)
    return model


def random_official_tree(seed: int, gating: str, *, V=97, L=3, N=4, K=2, H=12, F=40):
    """A raw released-layout tree drawn directly (no model, no writer of ours), float32."""
    rng = np.random.default_rng(seed)

    def normal(shape, fan_in):
        return rng.normal(0, fan_in**-0.5, shape).astype(np.float32)

    raw = {
        "transformer/embedder": {"input_embedding": normal((V + 7, D), D)},
        "transformer/final_norm": {"scale": rng.normal(0, 0.3, D).astype(np.float32)},
    }
    for i in range(L):
        p = f"transformer/layer_{i}/"
        raw[p + "attn/q_einsum"] = {"w": normal((N, D, H), D) * 3}  # peaky attention
        raw[p + "attn/kv_einsum"] = {
            "w": normal((2, K, D, H), D) * np.array([3, 1]).reshape(2, 1, 1, 1).astype(np.float32)
        }
        raw[p + "attn/attn_vec_einsum"] = {"w": normal((N, H, D), N * H)}
        raw[p + "mlp/gating_einsum"] = {"w": normal((2, D, F) if gating == "DF" else (2, F, D), D)}
        raw[p + "mlp/linear"] = {"w": normal((F, D), F)}
        for norm in NORMS:
            raw[p + norm] = {"scale": rng.normal(0, 0.3, D).astype(np.float32)}
    ours = Gemma2Config(
        vocab_size=V,
        d_model=D,
        num_layers=L,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        ffn_dim=F,
        query_pre_attn_scalar=H,
        sliding_window=5,
        max_seq_len=128,
    )
    return raw, ours


def theirs_config(c: Gemma2Config):
    from transformers import Gemma2Config as HFConfig

    return HFConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        query_pre_attn_scalar=c.query_pre_attn_scalar,
        sliding_window=5,
        max_position_embeddings=128,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
    )


def remapped(raw):
    """The official library's param_remapper: '.../mlp/gating_einsum' {'w'} -> '.../mlp' {...}."""
    out: dict = {}
    for k, v in raw.items():
        if "/mlp/" in k:
            layer, param = k.rsplit("/", 1)
            out.setdefault(layer, {})[param] = v["w"]
        else:
            out[k] = v
    return out


def nested(flat):
    """The official library's nest_params: split every key on '/'."""
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


TOKENS = np.random.default_rng(1).integers(0, 97, (2, 19))


@pytest.mark.parametrize("gating", ["DF", "FD"])
def test_raw_official_tree_matches_an_independent_implementation(gating):
    raw, config = random_official_tree(seed=len(gating) + (gating == "FD"), gating=gating)
    theirs = hf_logits(hf_from_official(raw, theirs_config(config)), TOKENS)
    assert np.abs(theirs).max() > 1.0  # large enough that a wrong weight would show
    for form in (raw, remapped(raw), nested(raw), nested(remapped(raw))):
        model = load_flax(form, config=config)
        assert model.embedder.embedding.shape == (97, D)  # the 7 extra rows are dropped
        assert_close(model(jnp.asarray(TOKENS)), theirs, REL, f"{gating} tree")


# ----------------------------------------------------------------------------- the fixtures
def test_fixture_layouts_are_the_released_ones(release):
    import orbax.checkpoint as ocp

    for name in FIXTURE_NAMES:
        hf = model_dir(name, "hf", release)
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and not (hf / "model.safetensors").exists()
        assert all(re.fullmatch(r"model-0000\d-of-0000\d\.safetensors", s) for s in shards)
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(hf / shard))
        assert set(tensors) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
        assert tensors["model.embed_tokens.weight"].shape == (TOKENIZER_VOCAB, D)
        cfg = json.loads((hf / "config.json").read_text())
        assert "layer_types" not in cfg and "rope_parameters" not in cfg
        assert cfg["rope_theta"] == 10000.0 and cfg["transformers_version"] == "4.42.4"
        assert cfg["hidden_act"] == cfg["hidden_activation"] == "gelu_pytorch_tanh"
        assert cfg["eos_token_id"] == ([1, 107] if name.endswith("-it") else 1)
        assert cfg["vocab_size"] == TOKENIZER_VOCAB
        assert config_from_hf(cfg, name="x") == fixture_config().replace(
            name="x", param_dtype="float32"
        )

        flax = model_dir(name, "flax", release)
        raw = ocp.PyTreeCheckpointer().restore(str(flax / name.replace("gemma-2-", "gemma2-")))
        assert "transformer/layer_0/mlp/gating_einsum" in raw  # flat module-path keys
        assert raw["transformer/layer_0/mlp/gating_einsum"]["w"].shape == (2, D, 96)  # (2, D, F)
        assert raw["transformer/layer_3/mlp/linear"]["w"].shape == (96, D)
        assert raw["transformer/layer_1/attn/kv_einsum"]["w"].shape == (2, 4, D, 16)
        assert raw["transformer/embedder"]["input_embedding"].shape == (
            TOKENIZER_VOCAB + FLAX_EXTRA_ROWS,
            D,
        )
        assert raw["transformer/final_norm"]["scale"].dtype == ml_dtypes.bfloat16
        assert (flax / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()


def test_fixture_tokenizer_has_gemmas_id_layout(release):
    tok = Tokenizer(model_dir("gemma-2-2b-it", "hf", release) / "tokenizer.model")
    assert tok.vocab_size == TOKENIZER_VOCAB
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert [tok.id_to_piece(i) for i in (5, 6, 7, 105)] == [
        "<2mass>",
        "[@BOS@]",
        "<unused0>",
        "<unused98>",
    ]
    text = "<start_of_turn>user\nWhat light through yonder window breaks?<end_of_turn>\n"
    ids = tok.encode(text)
    assert ids[0] == 106 and 107 in ids and tok.decode(ids) == text


def test_flax_and_hf_fixtures_hold_the_same_model(release):
    for name in FIXTURE_NAMES:
        from_hf = load_hf(model_dir(name, "hf", release))
        flax_dir = model_dir(name, "flax", release)
        # Kaggle's folder (checkpoint directory + tokenizer.model) is accepted as it is.
        from_flax = load_flax(flax_dir, config=fixture_config())
        a, b = to_arrays(from_hf), to_arrays(from_flax)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    base, it = (to_arrays(load_hf(model_dir(n, "hf", release))) for n in FIXTURE_NAMES)
    assert not np.array_equal(base[("layers", 0, "attn", "q")], it[("layers", 0, "attn", "q")])


def test_orbax_fixture_matches_an_independent_implementation(release):
    """The on-disk raw tree, restored by Orbax and converted independently, and transformers
    reading the HF folder (its 4.42 config.json included): both give our logits."""
    import orbax.checkpoint as ocp
    import torch
    from transformers import Gemma2Config as HFConfig
    from transformers import Gemma2ForCausalLM

    tokens = np.random.default_rng(2).integers(0, TOKENIZER_VOCAB, (2, 21))
    for name in FIXTURE_NAMES:
        hf_dir, flax_dir = model_dir(name, "hf", release), model_dir(name, "flax", release)
        raw = ocp.PyTreeCheckpointer().restore(str(flax_dir / name.replace("gemma-2-", "gemma2-")))
        theirs_flax = hf_logits(hf_from_official(raw, HFConfig.from_pretrained(hf_dir)), tokens)
        theirs_hf = hf_logits(
            Gemma2ForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, attn_implementation="eager"
            ).eval(),
            tokens,
        )
        ours_flax = load_flax(flax_dir, config=fixture_config(), dtype=jnp.float32)
        ours_hf = load_hf(hf_dir, jnp.float32)
        assert_close(ours_flax(jnp.asarray(tokens)), theirs_flax, REL, f"{name} flax")
        assert_close(ours_hf(jnp.asarray(tokens)), theirs_hf, REL, f"{name} hf")


def test_fixtures_are_deterministic(release, tmp_path):
    import orbax.checkpoint as ocp

    again = write_fixtures(tmp_path, names=["gemma-2-2b-it"])
    for layout in ("hf", "flax"):
        first, second = (model_dir("gemma-2-2b-it", layout, r) for r in (release, again))
        files = sorted(p.relative_to(first) for p in first.iterdir() if p.is_file())
        assert files == sorted(p.relative_to(second) for p in second.iterdir() if p.is_file())
        for f in files:
            assert (first / f).read_bytes() == (second / f).read_bytes(), f
    # Orbax names its data files itself; the tensors it restores are what must agree.
    a, b = (
        ocp.PyTreeCheckpointer().restore(
            str(model_dir("gemma-2-2b-it", "flax", r) / "gemma2-2b-it")
        )
        for r in (release, again)
    )
    assert a.keys() == b.keys()
    for k in a:
        for leaf in a[k]:
            np.testing.assert_array_equal(a[k][leaf], b[k][leaf])
    size = sum(f.stat().st_size for f in release.rglob("*") if f.is_file())
    assert size < 4_000_000


def test_chat_with_the_it_fixture_uses_the_real_turn_ids(release):
    folder = model_dir("gemma-2-2b-it", "hf", release)
    tok = Tokenizer(folder / "tokenizer.model")
    session = ChatSession(load_hf(folder), tok, max_new_tokens=6, seed=0)
    session.send("Who is there?")
    session.send("Nay, answer me.")
    assert session.history[:2] == [2, 106]
    assert session.history.count(106) == 4 and session.history.count(107) >= 3
    assert session.stop_tokens == (107, 1)
