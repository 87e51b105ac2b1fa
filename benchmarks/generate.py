"""Generation benchmark: gemma2_lite's sampler against Hugging Face transformers, on CPU.

    python benchmarks/generate.py            # full run (several minutes on a 2-core CPU)
    python benchmarks/generate.py --quick    # smoke run (smaller, fewer repetitions)

Prints three tables:

(a) decode speed, tokens/s, of ``gemma2_lite.sampler.generate`` (one compiled program:
    prefill + a ``lax.while_loop`` over decode steps; and the streaming path, one jitted call
    per token) and of transformers' ``Gemma2ForCausalLM.generate`` (eager attention, its own
    KV cache), on the same weights (written with ``save_hf``, read with ``from_pretrained``),
    greedy, same prompt, same number of new tokens. Repetitions are interleaved so that load
    from other processes hits every contestant alike; medians are reported. Decode speed
    excludes the prompt: (N - 1) / (time(N new tokens) - time(1 new token)). Then the bytes
    XLA copies inside the decode loop on every step, read from the compiled program (the model
    stores its weights as rows, which the loop reads in place).
(b) time per decoded token at several context lengths for a model with a small window W:
    a local layer's attention reads its W-slot ring buffer whatever the context, a global
    layer's reads every cached position, so only the global share grows.
(c) KV-cache bytes of the report's configs at the full 8192 context in bfloat16, with one
    cache size for every layer (as the official sampler does) and with W-slot ring buffers
    for the local layers (as here), from the memory planner (``gemma2_lite.memory``).
(d) prefill alone (one jitted program), (e) a chat's turns with the cache kept, and (f) the
    whole ``generate(model, prompts, max_new_tokens=1)`` call against transformers'
    ``generate``: the prefill and everything a call costs around it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma2_lite import Gemma2, get_config, param_counts
from gemma2_lite.attention import (
    Attention,
    AttentionPlan,
    LayerCache,
    attention_mask,
    cached_key_positions,
)
from gemma2_lite.checkpoint import save_hf
from gemma2_lite.decoding import decode_program
from gemma2_lite.memory import kv_cache_bytes
from gemma2_lite.rope import rope_table
from gemma2_lite.sampler import (
    DecodeState,
    PromptCache,
    SamplingSettings,
    decode_loop,
    generate,
    prefill,
)

# ~20M parameters: V matches the book's tokenizer.
BENCH_CONFIG = dict(
    vocab_size=4096,
    d_model=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=2,
    head_dim=64,
    ffn_dim=1536,
    query_pre_attn_scalar=64,
    sliding_window=64,
    max_seq_len=8192,
    name="bench-20m",
)


def machine() -> str:
    import flax

    lines = [
        f"python {platform.python_version()} on {platform.platform()}",
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
        f"flax {flax.__version__}",
    ]
    try:
        import torch
        import transformers

        lines.append(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}"
        )
    except ImportError:
        lines.append("torch/transformers not installed: the comparison is skipped")
    return "\n".join(lines)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*r) for r in rows]
    )


# ----------------------------------------------------------------------------- (a)
def bench_vs_hf(config: Any, prompt_len: int, new_tokens: int, reps: int) -> float | None:
    model = Gemma2(config, rngs=nnx.Rngs(0))
    counts = param_counts(config)
    print(
        f"\n(a) decode speed, {config.name}: {sum(counts.values()) / 1e6:.1f}M parameters "
        f"(V={config.vocab_size} D={config.d_model} L={config.num_layers} N={config.num_heads} "
        f"K={config.num_kv_heads} H={config.head_dim} F={config.ffn_dim} "
        f"W={config.sliding_window})"
        f", batch 1, prompt {prompt_len} tokens, greedy, {new_tokens} new tokens, float32"
    )
    rng = np.random.default_rng(0)
    prompt = [2] + rng.integers(10, config.vocab_size, prompt_len - 1).tolist()

    def ours(n: int) -> list[int]:
        return generate(model, [prompt], max_new_tokens=n)[0]

    def ours_streaming(n: int) -> list[int]:
        return generate(model, [prompt], max_new_tokens=n, callback=lambda step, toks: None)[0]

    contestants: dict[str, Callable[[int], list[int]]] = {
        "gemma2_lite (while_loop)": ours,
        "gemma2_lite (per-step jit)": ours_streaming,
    }
    try:
        import torch
        from transformers import Gemma2ForCausalLM

        have_torch = True
    except ImportError:
        have_torch = False
    if have_torch:
        tmp = tempfile.TemporaryDirectory()
        save_hf(model, tmp.name)
        hf = Gemma2ForCausalLM.from_pretrained(
            tmp.name, attn_implementation="eager", dtype=torch.float32
        ).eval()
        ids = torch.tensor([prompt])
        default_threads = torch.get_num_threads()

        def hf_with(threads: int) -> Callable[[int], list[int]]:
            def theirs(n: int) -> list[int]:
                torch.set_num_threads(threads)
                with torch.no_grad():
                    out = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=0,
                        eos_token_id=None,
                    )
                torch.set_num_threads(default_threads)
                return out[0, len(prompt) :].tolist()

            return theirs

        # torch's intra-op threads spin while they wait: on a loaded machine one thread can be
        # much faster than several, so both are measured and the faster one is the reference.
        for threads in sorted({1, default_threads}):
            contestants[f"transformers eager, {threads} thread(s)"] = hf_with(threads)

    # Warm up (compiles ours, which then caches one program per shape) and check agreement.
    outputs, warm = {}, {}
    for name, fn in contestants.items():
        fn(1)
        start = time.perf_counter()
        outputs[name] = fn(new_tokens)
        warm[name] = time.perf_counter() - start
    hf_names = [n for n in contestants if n.startswith("transformers")]
    if len(hf_names) > 1:  # keep only the faster torch thread setting
        # (not named `hf`: the contestants' closures read the model by that name)
        fastest = min(warm[name] for name in hf_names)
        for name in hf_names:
            if warm[name] > 1.5 * fastest:
                print(
                    f"{name}: {new_tokens / warm[name]:.1f} tok/s in the warm-up run, "
                    f"{warm[name] / fastest:.1f}x slower than the other setting: not repeated"
                )
                del contestants[name]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(reps):  # interleaved: every contestant shares the same noise
        for name, fn in contestants.items():
            for n in (1, new_tokens):
                times.setdefault((name, n), []).append(_timed(functools.partial(fn, n)))
    rows = []
    speed: dict[str, tuple[float, float]] = {}
    for name in contestants:
        # Decode-only time per token, from the best and the median repetition.
        per_token = [
            (min(times[(name, new_tokens)]) - min(times[(name, 1)])) / (new_tokens - 1),
            (statistics.median(times[(name, new_tokens)]) - statistics.median(times[(name, 1)]))
            / (new_tokens - 1),
        ]
        speed[name] = (1 / max(per_token[0], 1e-9), 1 / max(per_token[1], 1e-9))
        rows.append(
            [
                name,
                f"{min(times[(name, 1)]) * 1e3:.1f}",
                f"{min(times[(name, new_tokens)]) * 1e3:.0f}",
                f"{per_token[0] * 1e3:.2f}",
                f"{per_token[1] * 1e3:.2f}",
                f"{speed[name][0]:.0f}",
                f"{speed[name][1]:.0f}",
            ]
        )
    print(
        _table(
            [
                "",
                "prefill+1 ms",
                f"prefill+{new_tokens} ms",
                "ms/token best",
                "ms/token median",
                "decode tok/s best",
                "tok/s median",
            ],
            rows,
        )
    )
    print(
        f"{reps} interleaved repetitions; decode = (time({new_tokens} new) - time(1 new)) "
        f"/ {new_tokens - 1}"
    )
    hf_names = [n for n in contestants if n.startswith("transformers")]
    ratio = None
    if hf_names:
        ref_name = max(hf_names, key=lambda n: speed[n][1])
        ratio = speed["gemma2_lite (while_loop)"][1] / speed[ref_name][1]
        ref = outputs[ref_name]
        for name in contestants:
            if name.startswith("gemma2_lite"):
                same = sum(a == b for a, b in zip(outputs[name], ref))
                print(
                    f"{name}: greedy tokens equal to transformers' at {same}/{len(ref)} steps; "
                    f"decode speed vs {ref_name}: {speed[name][0] / speed[ref_name][0]:.1f}x "
                    f"(best), {speed[name][1] / speed[ref_name][1]:.1f}x (median)"
                )
    return ratio


# ----------------------------------------------------------------------------- (b)
def _synthetic_cache(cache: list[LayerCache], context: int, seed: int) -> list[LayerCache]:
    """A cache as if ``context`` tokens had been processed (random keys/values: timing only)."""
    out = []
    for i, layer in enumerate(cache):
        b, _, k, h = layer.k.shape
        key = jax.random.key(seed + i)
        kk, vv = jax.random.normal(key, (2, b, context, k, h), layer.k.dtype)
        pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (b, context))
        out.append(layer.update(kk, vv, pos))
    return out


def _synthetic_state(
    model: Gemma2, context: int, steps: int, size: int, seed: int = 0
) -> DecodeState:
    """Batch 1, greedy, ``steps`` tokens to decode after ``context`` synthetic positions in a
    cache of ``size`` columns (timing and compiled-program inspection only)."""
    return DecodeState(
        out=jnp.zeros((1, steps), jnp.int32),
        last=jnp.full((1,), 7, jnp.int32),
        positions=jnp.full((1,), context, jnp.int32),
        done=jnp.zeros((1,), bool),
        step=jnp.zeros((), jnp.int32),
        key=jax.random.key(0),
        cache=_synthetic_cache(model.init_cache(1, size), context, seed=seed),
    )


def loop_copies(hlo: str) -> tuple[int, int]:
    """Copies (and transposes) that XLA placed inside the while-loop bodies of a compiled
    program's text, and the bytes they write: work repeated on every decode step."""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    count = size = 0
    for block in hlo.split("\n\n"):
        head = re.match(r"\s*(?:ENTRY )?%([\w.\-]+) ", block)
        if not head or head.group(1) not in bodies:
            continue
        for name, dtype, dims in re.findall(
            r"\n\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", block
        ):
            if "copy" in name or "transpose" in name:
                count += 1
                bits = int(re.sub(r"\D", "", dtype) or 8)  # f32 -> 32, pred -> 8
                size += int(np.prod([int(d) for d in dims.split(",") if d])) * bits // 8
    return count, size


def report_loop_copies(config: Any) -> None:
    """How many bytes the decode loop copies per token, float32 and bf16 weights, read from the
    compiled programs' text (no timing)."""
    model = Gemma2(config, rngs=nnx.Rngs(0))
    settings = SamplingSettings.make(0.0, None, None, (), 8)
    state = _synthetic_state(model, context=64, steps=8, size=256)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    bf16 = Gemma2(config.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    for name, m in (("float32 weights", model), ("bf16 weights", bf16)):
        n, size = loop_copies(decode_program(m, state, settings).as_text())
        print(
            f"decode loop, {name}: {n} copies per step writing {size / 2**20:.2f} MiB "
            f"(the weights are {weights / 2**20:.1f} MiB)"
        )


def bench_context(config: Any, contexts: list[int], steps: int, reps: int) -> float:
    model = Gemma2(config, rngs=nnx.Rngs(0))
    settings = SamplingSettings.make(0.0, None, None, (), steps)
    w = config.sliding_window
    print(
        f"\n(b) time per decoded token vs context, {config.name}, W={w}, batch 1, best of "
        f"{reps} timings (least disturbed by other processes) of {steps} model steps / "
        f"{8 * steps} steps of one attention layer"
    )
    # One attention layer of each kind, timed alone over the same steps.
    attn = {
        kind: Attention(config, w if kind == "local" else None, rngs=nnx.Rngs(1))
        for kind in ("local", "global")
    }

    rows = []
    for c in contexts:
        state = _synthetic_state(model, context=c, steps=steps, size=c + steps, seed=c)
        run = lambda state=state: jax.block_until_ready(
            decode_loop(model, state, settings, donate=False)
        )
        run()
        t_model = min(_timed(run) for _ in range(reps)) / steps
        per_kind = {}
        for kind, layer in attn.items():
            size = min(w, c + steps) if kind == "local" else c + steps
            lc = _synthetic_cache(
                [LayerCache.empty(1, size, config.num_kv_heads, config.head_dim)], c, seed=1
            )[0]
            per_kind[kind] = _time_attention(layer, lc, c, 8 * steps, reps, config.d_model)
        slots = [cl.size for cl in state.cache]
        rows.append(
            [
                str(c),
                f"{t_model * 1e3:.2f}",
                f"{per_kind['local'] * 1e6:.0f}",
                f"{per_kind['global'] * 1e6:.0f}",
                f"{min(slots)} / {max(slots)}",
            ]
        )
    print(
        _table(
            [
                "context",
                "model ms/token",
                "local attn µs/token",
                "global attn µs/token",
                "cache slots local / global",
            ],
            rows,
        )
    )
    local = [float(r[2]) for r in rows]
    return local[-1] / local[0]


def _time_attention(
    layer: Attention, cache: LayerCache, context: int, steps: int, reps: int, d_model: int
) -> float:
    """Seconds per step of one attention layer decoding ``steps`` tokens after ``context``."""
    graphdef, params = nnx.split(layer)

    @jax.jit
    def loop(params: nnx.State, cache: LayerCache, x: jax.Array) -> jax.Array:
        layer = nnx.merge(graphdef, params)

        def body(i: jax.Array, carry: tuple[jax.Array, LayerCache]) -> tuple[jax.Array, LayerCache]:
            h, cache = carry
            pos = jnp.full((1, 1), context, jnp.int32) + i
            # What the model builds once per forward: the rotation table and the mask.
            rope = rope_table(pos, layer.head_dim, layer.rope_base)
            mask = attention_mask(pos, cached_key_positions("decode", cache, pos), layer.window)
            out, new_cache = layer(h, rope, mask, pos, cache, AttentionPlan("decode"))
            assert new_cache is not None  # a cache in, a cache out
            return out, new_cache

        return jax.lax.fori_loop(0, steps, body, (x, cache))[0]

    x = jax.random.normal(jax.random.key(0), (1, 1, d_model))
    run = lambda: jax.block_until_ready(loop(params, cache, x))
    run()
    return min(_timed(run) for _ in range(reps)) / steps


# ----------------------------------------------------------------------------- (d)
def bench_prefill(config: Any, batch: int, seq: int, reps: int) -> float | None:
    """Prefill as each library's generate does it: the prompt through the model, the cache
    filled, logits for the last position only (transformers: ``logits_to_keep=1``)."""
    model = Gemma2(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.default_rng(1).integers(10, config.vocab_size, (batch, seq))
    tokens_j, mask_j = jnp.asarray(tokens, jnp.int32), jnp.ones((batch, seq), bool)

    @jax.jit
    def ours_fn(params: nnx.State, tokens: jax.Array, mask: jax.Array) -> Any:
        m = nnx.merge(graphdef, params)
        return prefill(m, tokens, mask, m.init_cache(batch, seq))

    print(f"\n(d) prefill, {config.name}, B={batch} T={seq}, float32, last-position logits")
    ours = lambda: jax.block_until_ready(ours_fn(params, tokens_j, mask_j))
    hf = _hf_twin(model)
    if hf is None:
        return None
    import torch

    ids = torch.tensor(tokens)

    def theirs() -> Any:
        with torch.no_grad():
            return hf(
                ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1
            ).logits

    mine, ref = np.asarray(ours()[0]), theirs()[:, -1].numpy()
    print(f"max |last logits, ours - transformers| = {np.abs(mine - ref).max():.1e}")
    t_ours, t_theirs = [], []
    for _ in range(reps):  # interleaved: both see the same machine load
        t_ours.append(_timed(ours))
        t_theirs.append(_timed(theirs))
    ratio = statistics.median(t_theirs) / statistics.median(t_ours)
    n = batch * seq
    print(
        _table(
            ["", "median ms", "tokens/s"],
            [
                [
                    "gemma2_lite prefill (jit)",
                    f"{statistics.median(t_ours) * 1e3:.1f}",
                    f"{n / statistics.median(t_ours):,.0f}",
                ],
                [
                    "transformers eager",
                    f"{statistics.median(t_theirs) * 1e3:.1f}",
                    f"{n / statistics.median(t_theirs):,.0f}",
                ],
            ],
        )
    )
    print(f"prefill speed vs transformers: {ratio:.2f}x (median of {reps})")
    return ratio


# ----------------------------------------------------------------------------- (f)
def bench_end_to_end(config: Any, batch: int, seq: int, reps: int) -> float | None:
    """``generate(model, prompts, max_new_tokens=1)`` against transformers'
    ``generate(max_new_tokens=1)``: the prefill plus everything a call costs around it
    (checking and padding the prompts, host transfers, the first token's sampling)."""
    model = Gemma2(config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(3).integers(10, config.vocab_size, (batch, seq))
    print(
        f"\n(f) end to end, {config.name}, B={batch} T={seq}, one new token, greedy, "
        "float32: the whole generate call"
    )
    hf = _hf_twin(model)
    if hf is None:
        return None
    import torch

    ids = torch.tensor(prompts)
    ours = lambda: generate(model, prompts.tolist(), max_new_tokens=1)

    def theirs() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, seq:].tolist()

    same = ours() == theirs()
    t_ours, t_theirs = [], []
    for _ in range(reps):  # interleaved: both see the same machine load
        t_ours.append(_timed(ours))
        t_theirs.append(_timed(theirs))
    ratio = statistics.median(t_theirs) / statistics.median(t_ours)
    print(
        _table(
            ["", "median ms"],
            [
                ["gemma2_lite generate", f"{statistics.median(t_ours) * 1e3:.1f}"],
                ["transformers generate", f"{statistics.median(t_theirs) * 1e3:.1f}"],
            ],
        )
    )
    print(
        f"end-to-end speed vs transformers: {ratio:.2f}x (median of {reps}); first tokens "
        f"{'equal' if same else 'DIFFER'}"
    )
    products = products_alone(config, batch * seq)
    print(
        f"the prompt's matrix products alone (every layer's projections at {batch * seq} rows, "
        f"float32, XLA): {products * 1e3:.1f} ms, so at most "
        f"{statistics.median(t_theirs) / products:.2f}x transformers' call on this CPU"
    )
    return ratio


def products_alone(config: Any, rows: int) -> float:
    """Seconds for every layer's projections at ``rows`` rows (one jitted float32 product per
    shape, best of 10, times the layer count): a floor under the prompt's time whatever the
    rest (attention, norms) costs, so transformers' time over it bounds the end-to-end ratio."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_size import layer_shapes

    dot = jax.jit(lambda x, w: jnp.einsum("MD,FD->MF", x, w))
    total = 0.0
    for out, into in layer_shapes(config):
        x, w = jnp.ones((rows, into), jnp.float32), jnp.ones((out, into), jnp.float32)
        dot(x, w).block_until_ready()
        total += min(_timed(lambda: dot(x, w).block_until_ready()) for _ in range(10))  # noqa: B023
    return total * config.num_layers


def _hf_twin(model: Gemma2) -> Any:
    """transformers' Gemma2ForCausalLM with ``model``'s weights (float32, eager attention),
    or None when transformers is not installed."""
    try:
        import torch
        from transformers import Gemma2ForCausalLM
    except ImportError:
        print("transformers not installed: no reference")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        return Gemma2ForCausalLM.from_pretrained(
            tmp, attn_implementation="eager", dtype=torch.float32
        ).eval()


# ----------------------------------------------------------------------------- (e)
def bench_chat(
    config: Any, turns: int, user_len: int, reply_len: int, reps: int, cache_size: int
) -> float:
    """Latency of each turn of a conversation: PromptCache (the conversation's cache kept, only
    the new turn prefilled) against re-running generate on the whole history each turn."""
    model = Gemma2(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    users = [rng.integers(10, config.vocab_size, user_len).tolist() for _ in range(turns)]

    def session(kept: bool) -> list[float]:
        cache = PromptCache(model, size=cache_size)
        history, times = [2], []
        for user in users:
            history = history + user
            t0 = time.perf_counter()
            if kept:
                reply = cache.generate(history, max_new_tokens=reply_len)
            else:
                reply = generate(model, [history], max_new_tokens=reply_len)[0]
            times.append(time.perf_counter() - t0)
            history = history + reply
        return times

    print(
        f"\n(e) chat, {config.name}: {turns} turns of {user_len} user tokens and {reply_len} "
        f"generated, batch 1, greedy; cache of {cache_size} positions; best of {reps}"
    )
    session(True), session(False)  # compile every shape once
    kept = [min(col) for col in zip(*[session(True) for _ in range(reps)])]
    redo = [min(col) for col in zip(*[session(False) for _ in range(reps)])]
    rows = [
        [str(i + 1), f"{k * 1e3:.0f}", f"{r * 1e3:.0f}"] for i, (k, r) in enumerate(zip(kept, redo))
    ]
    print(_table(["turn", "cache kept ms", "whole history re-prefilled ms"], rows))
    ratio = kept[-1] / kept[0]
    # One turn against another is at the mercy of a single timing; the least-squares slope
    # over all turns says whether latency grows with the conversation.
    slope = lambda ys: float(np.polyfit(np.arange(1, turns + 1), np.asarray(ys) * 1e3, 1)[0])
    print(
        f"turn {turns} / turn 1 latency: {ratio:.2f} with the cache kept, "
        f"{redo[-1] / redo[0]:.2f} re-prefilling; least-squares growth "
        f"{slope(kept):+.1f} ms per turn with the cache kept, {slope(redo):+.1f} re-prefilling"
    )
    return ratio


# ----------------------------------------------------------------------------- (c)
def cache_bytes(context: int = 8192) -> None:
    print(
        f"\n(c) KV-cache bytes per sequence at {context} context, bfloat16 "
        "(keys + values + int32 slot positions)"
    )
    rows = []
    for name in ("gemma2-2b", "gemma2-9b", "gemma2-27b"):
        cfg = get_config(name, dtype="bfloat16", param_dtype="bfloat16")
        # One cache size for every layer (as the official sampler does) vs W-slot ring buffers
        # for the local layers (as here); kv_cache_bytes is tested equal to init_cache's arrays.
        full = kv_cache_bytes(cfg, 1, context, ring_buffer=False)
        ring = kv_cache_bytes(cfg, 1, context)
        rows.append(
            [
                name,
                f"{cfg.num_layers}",
                f"{cfg.num_kv_heads}x{cfg.head_dim}",
                f"{full / 2**20:,.0f} MiB",
                f"{ring / 2**20:,.0f} MiB",
                f"{100 * (1 - ring / full):.0f}%",
            ]
        )
    print(
        _table(
            ["config", "L", "K x H", "same size every layer", "local = W-slot ring", "saved"], rows
        )
    )


# ----------------------------------------------------------------------------- main
def _targets(
    decode: float | None,
    prefill_ratio: float | None,
    e2e: float | None,
    local_growth: float,
    chat: float,
) -> None:
    """Issues 13 and 22's targets, each a ratio measured side by side in this run."""
    fmt = lambda x: "n/a (no transformers)" if x is None else f"{x:.2f}"
    print("\nsummary (ratios measured in this run):")
    print(
        _table(
            ["measure", "this run", "target"],
            [
                ["decode tok/s, ours / transformers", fmt(decode), ">= 3"],
                ["prefill tok/s, ours / transformers", fmt(prefill_ratio), ">= 2"],
                ["generate(max_new_tokens=1), ours / transformers", fmt(e2e), ">= 2.5"],
                [
                    "local-attention time per token, longest / shortest context",
                    f"{local_growth:.2f}",
                    "flat (~1)",
                ],
                ["chat latency, last turn / first turn (cache kept)", f"{chat:.2f}", "<= 1"],
            ],
        )
    )


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller, faster smoke run")
    args = parser.parse_args(argv)
    print(machine())
    if args.quick:
        cfg = get_config(
            "tiny",
            **{
                **BENCH_CONFIG,
                "d_model": 96,
                "num_layers": 4,
                "ffn_dim": 256,
                "name": "bench-quick",
            },
        )
        decode = bench_vs_hf(cfg, prompt_len=16, new_tokens=16, reps=2)
        report_loop_copies(cfg)
        local = bench_context(cfg, [64, 512], steps=8, reps=2)
        pre = bench_prefill(cfg, batch=2, seq=128, reps=2)
        e2e = bench_end_to_end(cfg, batch=2, seq=128, reps=2)
        chat = bench_chat(cfg, turns=4, user_len=12, reply_len=8, reps=1, cache_size=256)
    else:
        cfg = get_config("tiny", **BENCH_CONFIG)
        decode = bench_vs_hf(cfg, prompt_len=32, new_tokens=64, reps=5)
        report_loop_copies(cfg)
        local = bench_context(cfg, [64, 512, 2048, 8000], steps=32, reps=5)
        pre = bench_prefill(cfg, batch=4, seq=512, reps=5)
        e2e = bench_end_to_end(cfg, batch=2, seq=384, reps=7)
        chat = bench_chat(cfg, turns=10, user_len=24, reply_len=32, reps=3, cache_size=1024)
    cache_bytes()
    _targets(decode, pre, e2e, local, chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
