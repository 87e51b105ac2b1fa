"""The Gemma 2 decoder: embedding, L blocks alternating local and global attention, final norm,
tied unembedding and final logit soft-cap.

    h = E[tokens] * sqrt(D)
    for each layer:  h = h + post_attn_norm(attn(pre_attn_norm(h)))
                     h = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
    logits = c_f * tanh((final_norm(h) @ E.T) / c_f)

``model(tokens)`` returns the logits; ``model.forward(...)`` returns a :class:`Gemma2Output`
(logits, the updated cache, the hidden states). The functions a chapter may want to swap (the
attention kernel, the mask, the rotation, the activation) are :class:`Components`:
``model.replace(activation=...)`` gives the same weights with another component, no patching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import (
    CAPTURES,
    Attention,
    AttentionPlan,
    LayerCache,
    attention_mask,
    band_mask,
    cached_key_positions,
    gqa_attention,
)
from .checks import check_positions, check_token_ids
from .config import Gemma2Config
from .layers import Embedder, FeedForward, RMSNorm, Rows, gelu_tanh, shapes_only, soft_cap
from .rope import rope_table, rotate

__all__ = [
    "Block",
    "Components",
    "Gemma2",
    "Gemma2Output",
    "abstract_model",
    "positions_from_mask",
    "param_counts",
]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Absolute positions of a (left-)padded batch: cumsum(mask) - 1, int32 (B, T).

    Padding gets -1 before the first real token; real tokens count 0, 1, 2, ...
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) - 1


@dataclass(frozen=True)
class Components:
    """The functions the model is built from, each replaceable (the chapters' seam).

    attention: ``(q (B,T,N,H), k, v (B,S,K,H), mask (B,T,S), *, softcap) -> (out (B,T,N,H),
    probs)``; mask: ``(q_pos (B,T), k_pos (B,S), window) -> bool (B,T,S)``; rope_table:
    ``(positions (B,T), H, base) -> table``; rotate: ``(x (B,T,N,H), table) -> x``;
    activation: the GeGLU gate's ``x -> x``.
    """

    attention: Callable[..., tuple[jax.Array, jax.Array]] = gqa_attention
    mask: Callable[[jax.Array, jax.Array, int | None], jax.Array] = attention_mask
    rope_table: Callable[[jax.Array, int, float], Any] = rope_table
    rotate: Callable[[jax.Array, Any], jax.Array] = rotate
    activation: Callable[[jax.Array], jax.Array] = gelu_tanh


@jax.tree_util.register_dataclass
@dataclass
class Gemma2Output:
    """What :meth:`Gemma2.forward` returns (a pytree, so it passes through ``jit``).

    logits: float32 (B, T, V), or (B, 1, V) with ``last_only``; cache: the updated list of L
    :class:`LayerCache` when one was given, else None; hidden: with ``return_hidden``, the
    residual stream after the embedding and after every layer (L + 1 arrays (B, T, D), the last
    one after the final norm, as Hugging Face reports it), else None; finite: bool (B, T) (or
    (B, 1)), whether every logit of that position was finite BEFORE the final soft-cap, which
    maps an infinite logit to a finite +-c_f (so only this field can tell that the model
    overflowed; the sampler checks it); captured: with ``capture=names``, ``{name: [L arrays]}``
    of each layer's attention intermediates (:data:`~gemma2_lite.attention.CAPTURES`), else None.
    """

    logits: jax.Array
    cache: list[LayerCache] | None = None
    hidden: list[jax.Array] | None = None
    finite: jax.Array | None = None
    captured: dict[str, list[jax.Array]] | None = None


class Block(nnx.Module):
    """One decoder layer, with Gemma 2's four norms (pre and post, around each sub-block)."""

    def __init__(
        self,
        config: Gemma2Config,
        layer_index: int,
        *,
        rngs: nnx.Rngs,
        components: Components = Components(),
    ):
        c = config
        pd = c.jnp_param_dtype
        self.kind = c.layer_types[layer_index]
        self.pre_attn_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.attn = Attention(
            c,
            c.window_for_layer(layer_index),
            rngs=rngs,
            attention_fn=components.attention,
            rotate_fn=components.rotate,
        )
        self.post_attn_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.pre_ffw_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)
        self.mlp = FeedForward(
            c.d_model,
            c.ffn_dim,
            rngs=rngs,
            param_dtype=pd,
            dtype=c.jnp_dtype,
            activation=components.activation,
        )
        self.post_ffw_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps, param_dtype=pd)

    def __call__(
        self,
        x: jax.Array,
        rope: Any,
        mask: jax.Array,
        k_pos: jax.Array,
        cache: LayerCache | None = None,
        plan: AttentionPlan = AttentionPlan(),
        captured: dict[str, list[jax.Array]] | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: (B, T, D) -> (B, T, D), plus the layer's updated cache (see :class:`Attention`)."""
        a, cache = self.attn(self.pre_attn_norm(x), rope, mask, k_pos, cache, plan, captured)
        x = x + self.post_attn_norm(a)
        m = self.mlp(self.pre_ffw_norm(x))
        x = x + self.post_ffw_norm(m)
        return x, cache


def _valid_mask(tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """The real-token mask, bool (B, T): ``attention_mask`` (default all ones) checked against
    the tokens' shape."""
    if attention_mask is None:
        return jnp.ones(tokens.shape, bool)
    valid = jnp.asarray(attention_mask).astype(bool)
    if valid.shape != tokens.shape:
        raise ValueError(f"attention_mask shape {valid.shape} != tokens shape {tokens.shape}")
    return valid


class Gemma2(nnx.Module):
    """Gemma 2 as a Flax NNX module.

    >>> model = Gemma2(get_config("tiny"), rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                       # int32 (B, T) -> float32 (B, T, V)
    >>> out = model.forward(tokens, cache=model.init_cache(B, 64))   # Gemma2Output
    >>> exact = model.replace(activation=gelu_exact)  # same weights, another component

    ``remat=True`` recomputes each block in the backward pass instead of storing its
    activations (``nnx.remat``): the same numbers for ~1/3 more FLOPs and far less memory.
    """

    def __init__(
        self,
        config: Gemma2Config,
        *,
        rngs: nnx.Rngs,
        components: Components | None = None,
        remat: bool = False,
    ):
        self.config = config
        self.components = components or Components()
        self.remat = bool(remat)
        self.embedder = Embedder(
            config.vocab_size, config.d_model, rngs=rngs, param_dtype=config.jnp_param_dtype
        )
        self.layers = nnx.List(
            [
                Block(config, i, rngs=rngs, components=self.components)
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(
            config.d_model, eps=config.rms_norm_eps, param_dtype=config.jnp_param_dtype
        )

    def __repr__(self) -> str:
        # Quantized weights (int8 rows) count too; their scales do not.
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(self, nnx.Param, Rows)))
        return f"Gemma2({self.config!r}, {n:,} parameters)"

    __str__ = __repr__  # nnx's tree view is one call away: nnx.display(model)

    def replace(self, *, remat: bool | None = None, **components: Any) -> Gemma2:
        """The same parameters (shared, not copied) with other :class:`Components` or remat.

        ``model.replace(attention=my_attention)`` runs ``my_attention`` in every layer;
        ``model.replace(remat=True)`` trains with rematerialised blocks.
        """
        unknown = set(components) - {f.name for f in dataclasses.fields(Components)}
        if unknown:
            raise TypeError(
                f"unknown component(s) {sorted(unknown)}; the components are "
                f"{[f.name for f in dataclasses.fields(Components)]}"
            )
        comps = dataclasses.replace(self.components, **components)
        abstract = abstract_model(
            self.config, components=comps, remat=self.remat if remat is None else remat
        )
        return nnx.merge(nnx.graphdef(abstract), nnx.state(self))

    # ------------------------------------------------------------------ input checks
    def _check_inputs(
        self,
        tokens: Any,
        positions: Any,
        cache: list[LayerCache] | None,
        attention_mask: Any = None,
    ) -> jax.Array:
        """Check the call's inputs; return ``tokens`` as a JAX integer array.

        Shapes are checked always (they are static, even under ``jit``); token ids and
        positions only when they are concrete (see :mod:`gemma2_lite.checks`): inside ``jit``
        an out-of-range id embeds as NaN (:meth:`Embedder.encode`) instead of being refused.
        """
        c = self.config
        if not hasattr(tokens, "ndim"):  # a list: each element checked (no bool as an id)
            tokens = check_token_ids(tokens, c.vocab_size, name="tokens")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T) integers, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        # Before jnp.asarray: with 64-bit mode off an int64 id of 2**32 + 5 would become 5.
        check_token_ids(tokens, c.vocab_size, name="tokens")
        b, t = tokens.shape
        if t == 0:
            raise ValueError(
                f"tokens has shape {tokens.shape}: every row needs at least one token (T >= 1)"
            )
        if cache is None and t > c.max_seq_len:
            raise ValueError(
                f"sequence of {t} tokens is longer than the model's "
                f"context ({c.max_seq_len}); truncate it or use a larger max_seq_len"
            )
        if positions is not None:
            try:
                np.shape(positions)
            except ValueError:  # ragged lists: check_positions names them
                check_positions(positions, c.max_seq_len)
                raise
            if np.shape(positions) != (b, t):
                raise ValueError(
                    f"positions has shape {np.shape(positions)}, tokens {(b, t)}: "
                    "pass one position per token"
                )
            check_positions(positions, c.max_seq_len, valid=attention_mask)
        if cache is not None:
            self._check_cache(cache, b, t)
        return jnp.asarray(tokens)

    def _check_cache(self, cache: list[LayerCache], batch: int, tokens_len: int) -> None:
        """A cache must have one entry per layer, the batch's rows, and room for the new columns.

        Rows share columns (:class:`LayerCache`). A layer whose cache has fewer slots than it
        attends to (a global layer: every column; a local one: W) would overwrite keys it still
        needs once the columns pass its size: refused here when the cache's ``end`` is concrete,
        since the logits would be silently wrong.
        """
        c = self.config
        if not isinstance(cache, (list, tuple)) or len(cache) != c.num_layers:
            got = len(cache) if hasattr(cache, "__len__") else type(cache).__name__
            raise ValueError(f"cache has {got} layers, the model {c.num_layers}")
        for i, layer in enumerate(cache):
            if layer.k.shape[0] != batch:
                raise ValueError(
                    f"cache[{i}] holds {layer.k.shape[0]} rows but tokens has "
                    f"{batch}: make the cache with init_cache(batch={batch}, ...)"
                )
        for i, layer in enumerate(cache):
            if isinstance(layer.end, jax.core.Tracer):
                return
            window = c.window_for_layer(i)
            end = int(layer.end) + tokens_len
            if (window is None or layer.size < window) and end > layer.size:
                raise ValueError(
                    f"{end} columns do not fit in the cache: layer {i} has {layer.size} slots "
                    f"({int(layer.end)} used); make a larger cache with init_cache(batch, max_len)"
                )

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        **unexpected: Any,
    ) -> jax.Array:
        """Next-token logits, float32 (B, T, V): ``self.forward(...).logits``.

        tokens: int (B, T); attention_mask: (B, T), 1 for real tokens, 0 for (left) padding;
        positions: int (B, T), default cumsum(mask) - 1. For a cache or the hidden states use
        :meth:`forward`, which returns a :class:`Gemma2Output`.
        """
        if unexpected:
            raise TypeError(
                f"Gemma2.__call__ got {sorted(unexpected)}: calling the model gives "
                "logits only; use model.forward(tokens, ..., cache=..., "
                "return_hidden=...), which returns a Gemma2Output"
            )
        return self.forward(tokens, attention_mask, positions=positions).logits

    def forward(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: list[LayerCache] | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        plan: AttentionPlan | None = None,
        capture: tuple[str, ...] = (),
    ) -> Gemma2Output:
        """The forward pass, with everything it can give.

        tokens: int (B, T), ids in [0, V): checked when concrete (a
        :class:`~gemma2_lite.checks.TokenIdError` names the bad ids); under ``jit`` they cannot
        be checked and an out-of-range id turns its position's logits into NaN.
        attention_mask: (B, T), 1 for real tokens and 0 for padding (left padding); default all
        ones. positions: int (B, T); default cumsum(mask) - 1, i.e. a sequence from position 0
        (with a cache, the cache must then be empty; a used cache needs the new tokens'
        absolute positions). cache: L :class:`LayerCache` (:meth:`init_cache`) for incremental
        decoding; the new tokens are written into it (rows in lock-step: a chunk's padding, if
        any, on the left). return_hidden: also return the residual streams. last_only: unembed
        only the last column (B, 1, V): all that sampling needs after a prefill (with left
        padding the last column is every row's last token), and V / (T·V) of the logits'
        memory. plan: how the layers attend (:class:`AttentionPlan`); default
        :meth:`AttentionPlan.choose` from the above. capture: names from
        :data:`~gemma2_lite.attention.CAPTURES` to keep from every layer's attention, in
        ``Gemma2Output.captured`` (the chapters' window on the model's insides; nothing is
        computed for them when empty, the default).
        """
        tokens = self._check_inputs(tokens, positions, cache, attention_mask)
        c, comps = self.config, self.components
        valid = _valid_mask(tokens, attention_mask)  # (B, T) bool
        plan = self._plan(plan, tokens.shape[1], positions, cache)
        captured = self._captures(capture, plan)
        if positions is None:
            positions = positions_from_mask(valid)
        positions = jnp.asarray(positions, jnp.int32)  # (B, T)
        k_pos = jnp.where(valid, positions, -1).astype(jnp.int32)  # (B, T), pads -1

        # Built once per forward, shared by the layers: the rotation table, and one mask per
        # kind of layer (global / local), over the keys that kind attends to in this plan.
        rope = comps.rope_table(positions, c.head_dim, c.rope_base)
        masks = self._masks(plan, positions, k_pos, cache)

        def run(
            block: Block, x: jax.Array, layer_cache: LayerCache | None
        ) -> tuple[jax.Array, LayerCache | None]:
            return block(x, rope, masks[block.attn.window], k_pos, layer_cache, plan, captured)

        if self.remat and cache is None and captured is None:
            # Keep only each block's input for the backward pass; recompute the rest.
            run = nnx.remat(run)

        x = self.embedder.encode(tokens, c.jnp_dtype)  # (B, T, D)
        hidden = [x]
        new_cache = []
        for i, block in enumerate(self.layers):
            x, layer_cache = run(block, x, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            hidden.append(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        x = self.final_norm(x)
        hidden[-1] = self.final_norm(hidden[-1]) if last_only else x
        raw = self.embedder.decode(x).astype(jnp.float32)  # (B, T, V)
        # Checked before the cap: c_f * tanh(inf / c_f) = c_f hides an overflow.
        finite = jnp.all(jnp.isfinite(raw), axis=-1)  # (B, T)
        logits = soft_cap(raw, c.final_logit_softcap)
        return Gemma2Output(
            logits=logits,
            cache=None if cache is None else cast(list[LayerCache], new_cache),  # all filled
            hidden=hidden if return_hidden else None,
            finite=finite,
            captured=captured,
        )

    @staticmethod
    def _captures(
        capture: tuple[str, ...], plan: AttentionPlan
    ) -> dict[str, list[jax.Array]] | None:
        """The forward's empty intermediates, ``{name: []}``, or None when nothing is asked."""
        if isinstance(capture, str):
            capture = (capture,)
        if not capture:
            return None
        unknown = sorted(set(capture) - set(CAPTURES))
        if unknown:
            raise ValueError(f"cannot capture {unknown}; capture names are {list(CAPTURES)}")
        if plan.band:
            # Banded layers compute their scores chunk by chunk, never as (B, T, N, S).
            raise ValueError(
                "capture= needs every layer's whole (T, S) scores; a banded plan "
                "(a long prompt into a cache) has none: call without the cache"
            )
        return {name: [] for name in capture}

    def _masks(
        self,
        plan: AttentionPlan,
        positions: jax.Array,
        k_pos: jax.Array,
        cache: list[LayerCache] | None,
    ) -> dict[int | None, jax.Array]:
        """One mask per kind of layer (keyed by its window), as the plan has it attend."""
        masks: dict[int | None, jax.Array] = {}
        for i, block in enumerate(self.layers):
            w = block.attn.window
            if w in masks:
                continue
            mode = plan.for_window(w)
            if mode == "banded":
                assert w is not None  # for_window bands only a local layer
                # A local layer over a whole prompt attends in chunks of W columns, each to
                # its own and the previous chunk's keys (attention.banded_attention).
                masks[w] = band_mask(self.components.mask, k_pos, w)  # (B, n, W, 2W)
            else:
                key_pos = cached_key_positions(mode, None if cache is None else cache[i], k_pos)
                masks[w] = self.components.mask(positions, key_pos, w)  # (B, T, S')
        return masks

    def _plan(
        self,
        plan: AttentionPlan | None,
        length: int,
        positions: Any,
        cache: list[LayerCache] | None,
    ) -> AttentionPlan:
        """The forward's :class:`AttentionPlan`: ``plan`` checked against the call, or chosen.

        A prompt from position 0 (positions not given) into a cache needs an empty one: checked
        when the cache's ``end`` is concrete (under ``jit`` it is the caller's promise)."""
        from_start = positions is None
        if cache is not None and from_start:
            ends = [layer.end for layer in cache if not isinstance(layer.end, jax.core.Tracer)]
            if any(int(e) for e in ends):
                raise ValueError(
                    "with a used cache, pass the absolute positions of the new "
                    "tokens (positions=...); without them the tokens would start "
                    "at position 0 again"
                )
        if plan is None:
            return AttentionPlan.choose(
                length=length,
                window=self.config.sliding_window,
                cached=cache is not None,
                from_start=from_start,
            )
        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
        if plan.mode != "full" and cache is None:
            raise ValueError(f"plan mode {plan.mode!r} needs a cache to read")
        if plan.mode == "decode" and length != 1:
            raise ValueError(f"plan mode 'decode' feeds one token per row, got {length}")
        if plan.band and not (from_start and cache is not None):
            # Bands are exact only when a key W positions back is W columns back.
            raise ValueError(
                "band=True needs a prompt into a cache with the default positions (positions=None)"
            )
        return plan

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[LayerCache]:
        """An empty cache for ``batch`` sequences of up to ``max_len`` positions.

        Global layers get ``max_len`` slots; local layers min(W, max_len) slots (a ring buffer).
        Columns count padding too: a left-padded prompt of T columns leaves max_len - T to
        generate.
        """
        c = self.config
        if max_len > c.max_seq_len:
            raise ValueError(f"max_len {max_len} is past the model's context ({c.max_seq_len})")
        dtype = dtype or c.jnp_dtype
        sizes = [
            max_len if w is None else min(w, max_len)
            for w in (c.window_for_layer(i) for i in range(c.num_layers))
        ]
        return [LayerCache.empty(batch, s, c.num_kv_heads, c.head_dim, dtype) for s in sizes]


def param_counts(config: Gemma2Config) -> dict[str, int]:
    """Embedding and non-embedding parameter counts, by abstract evaluation (no memory used).

    For the report's configs (256128-row embedding) this gives its table exactly, e.g.
    gemma2-2b: {"embedding": 590118912, "non_embedding": 2024517888}.

    Every layer has the same parameter shapes (local and global layers differ only in their
    mask), so one abstract *one-layer* model is traced and its layer counted ``num_layers``
    times: tracing all 46 layers of the 27B took about 15 s on a 2-core CPU, one layer a
    fraction of a second, with the same numbers.
    """
    one = abstract_model(config.replace(num_layers=1))
    sizes = [
        (path[0], int(np.prod(var.shape)))
        for path, var in nnx.to_flat_state(nnx.state(one, nnx.Param))
    ]
    layer = sum(n for top, n in sizes if top == "layers")
    embedding = int(np.prod(one.embedder.embedding.shape))
    total = sum(n for _, n in sizes) + (config.num_layers - 1) * layer
    return {"embedding": embedding, "non_embedding": total - embedding}


class _ShapeOnlyRngs:
    """What the model's constructor asks of its ``rngs`` (``rngs.params()``), for a trace that
    keeps only shapes: always the same key. An ``nnx.Rngs`` would count its draws in a
    variable, and each traced update of it costs time in the size of the trace so far (NNX
    asks the traced count for a ``sharding`` it cannot have, and JAX's error message searches
    the whole trace): 0.8 s for the 2B's 26 layers, against 0.05 s without."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_model(config: Gemma2Config, **kwargs: Any) -> Gemma2:
    """``Gemma2(config, ...)`` with shapes and dtypes but no memory (``nnx.eval_shape``): for
    counting, for a graphdef, for shardings. ``kwargs`` go to :class:`Gemma2` (e.g. remat)."""
    rngs: Any = _ShapeOnlyRngs()  # stands in for nnx.Rngs: only shapes are kept
    with shapes_only():  # and the initialisers draw nothing
        return nnx.eval_shape(lambda: Gemma2(config, rngs=rngs, **kwargs))
