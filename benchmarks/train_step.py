"""Achieved FLOP/s of one training step, as a fraction of this machine's dense matmul FLOP/s.

    python benchmarks/train_step.py                      # the book's tiny model, B=8, T=128
    python benchmarks/train_step.py --sweep              # a few widths/batches/dtypes
    python benchmarks/train_step.py --d-model 256 --batch 16 --dtype bfloat16

FLOPs of a step (forward + backward; the backward pass costs twice the forward, since each
matmul needs a gradient for both of its inputs), counted from the config:

    6 * P_mm * B*T                     every non-embedding matmul weight (q, k, v, o, gate, up,
                                       down: P_mm = L * (2*N*D*H + 2*K*D*H + 3*D*F)) does one
                                       multiply-add per token forward (2 FLOPs), times 3
  + 12 * L * B * T^2 * N * H           attention scores q.k (B*N*T*T*H MACs) and the
                                       probability-weighted sum of values (as many), times 3;
                                       the full T x T square is computed then masked, so it is
                                       counted in full (useful causal work is about half)
  + 6 * B*T * D * V                    the tied unembedding h @ E^T (the embedding lookup is a
                                       gather: no FLOPs; its gradient is in the factor 3)

Norms, soft-caps, RoPE, GeLU, softmax and AdamW are O(B*T*D) or O(params): not counted
(they cost memory traffic, not matmul FLOPs). The reference peak is a jitted fp32
``jnp.dot`` of two n x n matrices (2 n^3 FLOPs), timed in the same process, so both numbers see
the same threads and the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma2_lite import Gemma2, Gemma2Config, get_config
from gemma2_lite.train import TrainConfig, make_loss_fn, make_optimizer, make_train_step


def train_step_flops(cfg: Gemma2Config, batch: int, seq_len: int) -> dict[str, float]:
    """The three FLOP terms of one forward+backward step (see the module docstring)."""
    d, n, k, h, f, L, v = (
        cfg.d_model,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
        cfg.num_layers,
        cfg.vocab_size,
    )
    tokens = batch * seq_len
    p_mm = L * (2 * n * d * h + 2 * k * d * h + 3 * d * f)
    dense = 6.0 * p_mm * tokens
    attention = 12.0 * L * batch * seq_len**2 * n * h
    unembed = 6.0 * tokens * d * v
    return {
        "dense": dense,
        "attention": attention,
        "unembedding": unembed,
        "total": dense + attention + unembed,
        "matmul_params": p_mm,
    }


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: Any = jnp.float32) -> float:
    """Best-of-``repeats`` FLOP/s of a jitted n x n @ n x n product."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times)


def time_train_step(
    cfg: Gemma2Config, batch: int, seq_len: int, steps: int = 10, dtype: str = "float32"
) -> dict[str, float]:
    """Median and best seconds per step of the trainer's jitted step (after one warm-up step)."""
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq_len, dtype=dtype, progress=False)
    cfg = cfg.replace(dtype=dtype)
    model = Gemma2(cfg, rngs=nnx.Rngs(0))
    # flax types split's result as variadic; two filters give exactly three parts
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    rng = jax.random.PRNGKey(0)
    step = make_train_step(graphdef, tx, make_loss_fn(tc, False))
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, (steps + 1, batch, seq_len + 1))
    t0 = time.perf_counter()
    params, opt_state, rng, m = step(params, opt_state, rng, rest, None, jnp.asarray(data[0]))
    float(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, steps + 1):
        batch_arr = jnp.asarray(data[i])
        t0 = time.perf_counter()
        params, opt_state, rng, m = step(params, opt_state, rng, rest, None, batch_arr)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "best_s": min(times), "compile_s": compile_s}


def measure(cfg: Gemma2Config, batch: int, seq_len: int, dtype: str, steps: int) -> dict[str, Any]:
    flops = train_step_flops(cfg, batch, seq_len)
    t = time_train_step(cfg, batch, seq_len, steps, dtype)
    # best-of for both this and the matmul peak: on a shared machine the minimum is the time
    # with the least interference, and comparing min with min keeps the ratio consistent.
    achieved = flops["total"] / t["best_s"]
    return {
        "d_model": cfg.d_model,
        "layers": cfg.num_layers,
        "ffn": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
        "batch": batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "gflop_per_step": flops["total"] / 1e9,
        "flop_shares": {
            k: flops[k] / flops["total"] for k in ("dense", "attention", "unembedding")
        },
        "s_per_step": t["best_s"],
        "median_s_per_step": t["median_s"],
        "compile_s": t["compile_s"],
        "tokens_per_s": batch * seq_len / t["best_s"],
        "achieved_gflops": achieved / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--d-model", type=int, default=None, help="override D (F = 4 D, H = D / N)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--sweep", action="store_true", help="try several sizes and dtypes")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    def config(d_model: int | None) -> Gemma2Config:
        cfg = get_config(args.preset)
        if d_model is not None:
            cfg = cfg.replace(
                d_model=d_model,
                ffn_dim=4 * d_model,
                head_dim=d_model // cfg.num_heads,
                query_pre_attn_scalar=d_model // cfg.num_heads,
            )
        return cfg

    # The peak is measured before and after the steps and the larger is kept: a momentary
    # slowdown of the machine during one short measurement would otherwise lower the peak and
    # flatter every fraction below it.
    peak_before = matmul_peak(args.matmul_n, repeats=20)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"devices: {jax.devices()}  cpus: {os.cpu_count()}  load avg (1 min): {load:.1f}")
    if args.sweep:
        runs = [
            (None, 8, 128, "float32"),
            (None, 32, 128, "float32"),
            (256, 16, 128, "float32"),
            (256, 16, 128, "bfloat16"),
            (512, 16, 128, "float32"),
        ]
    else:
        runs = [(args.d_model, args.batch, args.seq_len, args.dtype)]
    results = [
        measure(config(d_model), batch, seq, dtype, args.steps)
        for d_model, batch, seq, dtype in runs
    ]
    peak_after = matmul_peak(args.matmul_n, repeats=20)
    peak = max(peak_before, peak_after)
    print(
        f"dense fp32 matmul peak ({args.matmul_n}^2 @ {args.matmul_n}^2, jitted, best of 20, "
        f"before and after the steps): {peak_before / 1e9:.1f} / {peak_after / 1e9:.1f} "
        f"GFLOP/s, using {peak / 1e9:.1f}"
    )
    for r in results:
        r["fraction_of_peak"] = r["achieved_gflops"] * 1e9 / peak
        batch, seq, dtype = r["batch"], r["seq_len"], r["dtype"]
        shares = " ".join(f"{k} {v:.0%}" for k, v in r["flop_shares"].items())
        print(
            f"D={r['d_model']:4d} L={r['layers']} V={r['vocab']} B={batch:3d} T={seq} {dtype:8s}: "
            f"{r['gflop_per_step']:.2f} GFLOP/step ({shares}), {r['s_per_step'] * 1e3:.0f} ms/step,"
            f" {r['tokens_per_s']:.0f} tok/s, {r['achieved_gflops']:.1f} GFLOP/s = "
            f"{r['fraction_of_peak']:.0%} of matmul peak"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "peak_gflops": peak / 1e9,
                    "peak_before_gflops": peak_before / 1e9,
                    "peak_after_gflops": peak_after / 1e9,
                    "load_avg": load,
                    "runs": results,
                },
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
