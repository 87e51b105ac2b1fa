"""Tiny checkpoints in exactly the layouts Gemma 2 was released in, for tests and CI.

    python -m gemma2_lite.book.fixtures OUT_DIR      # the program (gemma2_lite.book)

writes (:func:`write_fixtures`), for ``gemma-2-2b`` and ``gemma-2-2b-it`` (same tiny architecture,
different random weights; the folder layout is :mod:`gemma2_lite.weights`'s, so
``GEMMA2_LITE_WEIGHTS=OUT_DIR`` works too)::

    OUT_DIR/gemma-2-2b-it/
      hf/    config.json                  as transformers 4.42 wrote it: rope_theta at the top,
                                          no layer_types, eos_token_id [1, 107] (-it only)
             generation_config.json
             model.safetensors.index.json + model-0000k-of-0000n.safetensors (n >= 2, bf16)
             tokenizer.model
      flax/  gemma2-2b-it/                the Orbax checkpoint as released: flat module-path
                                          keys, "transformer/layer_0/mlp/gating_einsum" ->
                                          {"w": (2, D, F)} (the 2B's orientation), bf16, and
                                          the embedding 128 rows longer than the vocabulary
             tokenizer.model
      (each folder also holds FIXTURE.md, so it is never taken for the real weights; hf/
      also gemma2_lite_save.json, the manifest save_hf writes: sizes and sha256 of its files)

The tokenizer has Gemma's id layout: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
``<mask>`` 4, ``<2mass>`` 5, ``[@BOS@]`` 6, ``<unused0>``..``<unused98>`` 7..105,
``<start_of_turn>`` 106, ``<end_of_turn>`` 107, then newline runs, the 256 byte pieces and
merges learned from the book's corpus: :data:`TOKENIZER_VOCAB` pieces in all, standing for the
real 256000. The Hugging Face embedding has that many rows, the Flax one 128 more (256000 vs
256128 in the release). Every tensor and the tokenizer are the same on every run (fixed seeds,
single-threaded training); the whole set is under 2 MB and takes a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from .attention import Attention
from .checkpoint import Path_, from_arrays, hf_state_dict, save_hf, to_released_flax_tree
from .config import Gemma2Config
from .layers import FeedForward, drawn_shape
from .model import Gemma2, abstract_model
from .release import FIXTURE_MARKER, flax_checkpoint_name, model_dir
from .tokenizer import NEWLINE_PIECES, Tokenizer, train_tokenizer

__all__ = [
    "FIXTURE_NAMES",
    "FIXTURE_VERSION",
    "TOKENIZER_VOCAB",
    "FLAX_EXTRA_ROWS",
    "TURN_PIECES",
    "fixture_config",
    "fixture_tokenizer",
    "random_arrays",
    "released_hf_config",
    "write_fixtures",
    "ensure",
]

#: Bump when what :func:`write_fixtures` writes changes (cached copies are then rewritten).
FIXTURE_VERSION = 1
FIXTURE_NAMES = ("gemma-2-2b", "gemma-2-2b-it")
#: The fixture tokenizer's pieces (the real one has 256000).
TOKENIZER_VOCAB = 1024
#: Rows the official Flax embedding has beyond the tokenizer's (256128 - 256000).
FLAX_EXTRA_ROWS = 128
#: Gemma's user-defined pieces in id order from 4: ids 106 and 107 are the turn markers.
TURN_PIECES = (
    "<mask>",
    "<2mass>",
    "[@BOS@]",
    *(f"<unused{i}>" for i in range(99)),
    "<start_of_turn>",
    "<end_of_turn>",
)
_TOKENIZER_TEXT_CHARS = 120_000


def fixture_config(*, flax: bool = False) -> Gemma2Config:
    """The fixtures' tiny architecture (bf16 weights), shaped so orientation bugs show.

    The 2B's head counts (8 query, 4 key/value heads: a mesh that shards the real model's heads
    shards these too), but D=48, F=96 and N*H=128 all differ, so a transposed or mis-reshaped
    tensor cannot slip through with a matching shape. ``flax=True`` gives the Flax checkpoint's
    vocabulary (:data:`FLAX_EXTRA_ROWS` longer). Layers alternate local (window 8) / global.
    """
    return Gemma2Config(
        name="gemma-2-2b-fixture",
        vocab_size=TOKENIZER_VOCAB + (FLAX_EXTRA_ROWS if flax else 0),
        d_model=48,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=16,
        ffn_dim=96,
        query_pre_attn_scalar=16,
        sliding_window=8,
        param_dtype="bfloat16",
    )


def random_arrays(
    config: Gemma2Config, seed: int, *, qk_gain: float = 1.0
) -> dict[Path_, np.ndarray]:
    """Random float32 parameters for ``config`` (numpy, so no compilation per shape).

    Weights are fan-in scaled so logits stay O(1); norm scales are random too (N(0, 0.3)),
    because a fresh model's zeros would hide a lost or doubled ``1 + scale``. ``qk_gain`` > 1
    scales query/key weights up so attention is peaky, which makes a wrong mask or cache slot
    change the logits by far more than a test's tolerance.
    """
    abstract = abstract_model(config)
    rng = np.random.default_rng(seed)
    arrays = {}
    # Projections are drawn in the official einsum layout (the values every seed has always
    # given) and stored as the model's rows: stored axis j is drawn axis perm[j].
    perms: dict[str, tuple[int, ...]] = {**Attention.DRAWN, **FeedForward.DRAWN}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape, name = tuple(var.shape), path[-1]
        perm = perms.get(str(name))
        drawn = shape if perm is None else drawn_shape(shape, perm)
        if name == "scale":
            std = 0.3
        elif name == "embedding":  # (V, D): rows of norm ~1
            std = 1.0 / np.sqrt(shape[1])
        elif name in ("q", "k", "v"):  # drawn (N|K, D, H): fan-in D
            std = (qk_gain if name != "v" else 1.0) / np.sqrt(drawn[1])
        elif name == "o":  # drawn (N, H, D): fan-in N*H
            std = 1.0 / np.sqrt(drawn[0] * drawn[1])
        else:  # drawn gate/up (D, F), down (F, D)
            std = 1.0 / np.sqrt(drawn[0])
        values = rng.normal(0.0, std, drawn).astype(np.float32)
        arrays[tuple(path)] = (
            values if perm is None else np.ascontiguousarray(values.transpose(perm))
        )
    return arrays


def fixture_tokenizer() -> Tokenizer:
    """A SentencePiece tokenizer with Gemma's id layout (see the module docstring).

    Trained (single-threaded, so byte-identical every time) on the start of the book's corpus.
    """
    from .data import load_text

    text = load_text("train")[:_TOKENIZER_TEXT_CHARS]
    tok = train_tokenizer(
        [text],
        None,
        vocab_size=TOKENIZER_VOCAB,
        user_defined_symbols=[*TURN_PIECES, *NEWLINE_PIECES],
    )
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107), tok.special_ids
    return tok


def released_hf_config(config: Gemma2Config, *, instruct: bool) -> dict[str, object]:
    """``config.json`` as the released Gemma 2 folders have it (written by transformers 4.42).

    Unlike :func:`gemma2_lite.checkpoint.config_to_hf` (transformers 5.x): ``rope_theta`` at the
    top level, no ``rope_parameters`` or ``layer_types``, both ``hidden_act`` and
    ``hidden_activation``, ``cache_implementation: "hybrid"``, and ``eos_token_id`` ``[1, 107]``
    (``<eos>`` and ``<end_of_turn>``) on the instruction-tuned models.
    """
    c = config
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": c.attn_logit_softcap,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": [1, 107] if instruct else 1,
        "final_logit_softcapping": c.final_logit_softcap,
        "head_dim": c.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": c.d_model,
        "initializer_range": 0.02,
        "intermediate_size": c.ffn_dim,
        "max_position_embeddings": c.max_seq_len,
        "model_type": "gemma2",
        "num_attention_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.num_kv_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_base,
        "sliding_window": c.sliding_window,
        "torch_dtype": c.param_dtype,
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _marker(folder: Path, name: str) -> None:
    (folder / FIXTURE_MARKER).write_text(
        f"# Test fixture, not {name}\n\nTiny random weights written by `python -m "
        f"gemma2_lite.book.fixtures` in the layout {name} was released in. Its text is noise.\n"
    )


def _write_hf(folder: Path, model: Gemma2, name: str, tokenizer: Tokenizer) -> None:
    instruct = name.endswith("-it")
    total = sum(a.nbytes for a in hf_state_dict(model).values())
    config = released_hf_config(model.config, instruct=instruct)
    # Half the bytes per shard: at least two shards plus an index, as on the hub.
    save_hf(model, folder, max_shard_bytes=total // 2 + 1, hf_config=config)
    generation = {
        "_from_model_config": True,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": 0,
        "transformers_version": "4.42.4",
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer.model_proto)
    _marker(folder, name)


def _write_flax(folder: Path, model: Gemma2, name: str, tokenizer: Tokenizer) -> None:
    import orbax.checkpoint as ocp

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / flax_checkpoint_name(name)
    if ckpt.exists():
        shutil.rmtree(ckpt)  # Orbax refuses to overwrite a checkpoint
    tree = to_released_flax_tree(model, gating="DF")  # the 2B's (2, D, F)
    ocp.PyTreeCheckpointer().save(os.fspath(ckpt.resolve()), tree)
    (folder / "tokenizer.model").write_bytes(tokenizer.model_proto)
    _marker(folder, name)


def write_fixtures(out_dir: str | os.PathLike, names: Sequence[str] = FIXTURE_NAMES) -> Path:
    """Write the release-layout fixtures of ``names`` into ``out_dir``; return ``out_dir``.

    Both layouts of one name hold the same weights (the Flax embedding has
    :data:`FLAX_EXTRA_ROWS` extra rows at the end, which nothing ever looks up).
    """
    out = Path(out_dir)
    tokenizer = fixture_tokenizer()
    for name in names:
        if name not in FIXTURE_NAMES:
            raise ValueError(f"no fixture for {name!r}; fixtures exist for {FIXTURE_NAMES}")
        flax_config = fixture_config(flax=True)
        arrays = random_arrays(flax_config, seed=FIXTURE_NAMES.index(name))
        flax_model = from_arrays(flax_config, arrays)
        emb = ("embedder", "embedding")
        hf_model = from_arrays(fixture_config(), {**arrays, emb: arrays[emb][:TOKENIZER_VOCAB]})
        _write_hf(model_dir(name, "hf", out), hf_model, name, tokenizer)
        _write_flax(model_dir(name, "flax", out), flax_model, name, tokenizer)
    return out


def ensure(out_dir: str | os.PathLike | None = None) -> Path:
    """The fixtures' folder, written on first use (atomically, so parallel callers agree).

    Default ``out_dir``: ``gemma2-lite-fixtures-v{FIXTURE_VERSION}`` in the temporary directory.
    """
    out = (
        Path(out_dir)
        if out_dir is not None
        else Path(tempfile.gettempdir()) / f"gemma2-lite-fixtures-v{FIXTURE_VERSION}"
    )
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fixtures-", dir=out.parent))
    try:
        write_fixtures(staging)
        (staging / ".complete").write_text(f"{FIXTURE_VERSION}\n")
        try:
            staging.rename(out)  # atomic; fails if someone else won
        except OSError:
            if not done.exists():  # a stale, incomplete folder: replace it
                shutil.rmtree(out, ignore_errors=True)
                staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
