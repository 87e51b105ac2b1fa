"""Prefill throughput: gemma2_lite (jit) vs Hugging Face transformers (PyTorch eager), same weights.

    python benchmarks/forward.py            # ~20M-parameter config, prints tokens/s and the ratio
    python benchmarks/forward.py --quick    # a smaller, faster smoke run

Both run on the CPU in float32 with the same weights (ours exported with ``save_hf`` and loaded by
``Gemma2ForCausalLM.from_pretrained``, eager attention). Repetitions are interleaved (ours, theirs,
ours, ...) so that load on the machine affects both alike; the medians are compared.
Needs the test extras (transformers, torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma2_lite import Gemma2, get_config, param_counts
from gemma2_lite.checkpoint import save_hf

# ~20M parameters: 6.3M embedding + 6 layers x 2.2M.
BENCH = get_config(
    "tiny",
    name="bench-20m",
    vocab_size=16_384,
    d_model=384,
    num_layers=6,
    num_heads=6,
    num_kv_heads=2,
    head_dim=64,
    ffn_dim=1536,
    query_pre_attn_scalar=64,
    sliding_window=128,
    max_seq_len=1024,
)
QUICK = BENCH.replace(
    name="bench-quick",
    vocab_size=4096,
    d_model=128,
    num_layers=2,
    num_heads=4,
    head_dim=32,
    ffn_dim=512,
    query_pre_attn_scalar=32,
)


def run(quick: bool = False, reps: int | None = None) -> dict[str, float]:
    import torch
    from transformers import Gemma2ForCausalLM

    cfg = QUICK if quick else BENCH
    batch, seq = (2, 128) if quick else (4, 512)
    reps = reps or (3 if quick else 7)
    torch.set_num_threads(os.cpu_count() or 1)

    model = Gemma2(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        ref = Gemma2ForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq))
    tokens_jax, tokens_torch = jnp.asarray(tokens), torch.tensor(tokens)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))

    def ours() -> float:
        start = time.perf_counter()
        forward(state, tokens_jax).block_until_ready()
        return time.perf_counter() - start

    def theirs() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            ref(tokens_torch)
        return time.perf_counter() - start

    # Same numbers first (a fast benchmark of a wrong model is worthless).
    with torch.no_grad():
        diff = np.abs(
            np.asarray(forward(state, tokens_jax)) - ref(tokens_torch).logits.numpy()
        ).max()
    ours(), theirs()  # warm-up: compile / first-call allocations
    times_ours, times_theirs = [], []
    for _ in range(reps):
        times_ours.append(ours())
        times_theirs.append(theirs())
    n_tokens = batch * seq
    result = {
        "params": sum(param_counts(cfg).values()),
        "max_abs_logit_diff": float(diff),
        "ours_tok_s": n_tokens / statistics.median(times_ours),
        "ref_tok_s": n_tokens / statistics.median(times_theirs),
    }
    result["ratio"] = result["ours_tok_s"] / result["ref_tok_s"]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}"
    )
    print(f"config: {cfg!r}")
    print(
        f"prefill B={batch} T={seq} ({n_tokens} tokens), {reps} interleaved repetitions, "
        f"float32, {result['params']:,} parameters; max |logit diff| {diff:.1e}"
    )
    print(f"{'implementation':<28}{'median s':>10}{'tokens/s':>12}")
    print(
        f"{'gemma2_lite (jax.jit)':<28}{statistics.median(times_ours):>10.4f}"
        f"{result['ours_tok_s']:>12,.0f}"
    )
    print(
        f"{'transformers (torch eager)':<28}{statistics.median(times_theirs):>10.4f}"
        f"{result['ref_tok_s']:>12,.0f}"
    )
    print(f"ratio gemma2_lite / transformers: {result['ratio']:.2f}x  (target >= 1.5x)")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small config, few repetitions")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    run(quick=args.quick, reps=args.reps)


if __name__ == "__main__":
    main()
