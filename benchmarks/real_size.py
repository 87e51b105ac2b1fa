"""Gemma 2 2B at its real size on the CPU: memory and speed, ours next to transformers.

    python benchmarks/real_size.py                     # the real 2B (5.2 GB of bf16 weights)
    python benchmarks/real_size.py --layers 4          # 2B width and vocabulary, 4 layers (1.8 GB)
    python benchmarks/real_size.py --layers 2 --vocab 32000   # a quick smoke run

1. Writes the gemma2-2b configuration with random bf16 weights as a released Hugging Face
   folder holds it (vocab 256000, bf16 shards of <= 2 GB + index, a transformers-4.42
   config.json). Tensor names and shapes come from transformers' own ``Gemma2ForCausalLM``
   built on the meta device, so the tensors do not depend on our writer.
2. Measures the machine's memory bandwidth (reading a 1 GiB array), the ceiling of decoding,
   which reads every weight once per token.
3. Runs each side in its own subprocess, so each one's memory is its own, with default
   settings (no XLA flag): ``gemma2_lite.checkpoint.load_hf`` + ``gemma2_lite.sampler.generate``
   (bf16), the same after ``gemma2_lite.quantize.quantize(model, "int8")`` (the bf16 model then
   dropped), and ``Gemma2ForCausalLM.from_pretrained(dtype=bfloat16)`` + ``generate`` (eager
   attention), all reading the same folder.
4. Each side prefills a 256-token prompt and greedily decodes 32 tokens, batch 1.
   Prefill speed = 256 / time(1 new token); decode speed = 31 / (time(32) - time(1)); each
   time is the best of 3 runs. Also measured apart: the prefill's matrix products alone (one
   layer's projections at 256 rows, bf16), XLA's against torch's, the ceiling of prefill.
   Our programs are compiled by a first, untimed call (its time is printed apart).

Prints, per side: load time (int8: and quantization); resident memory after load and the peak
during the load; the peak during generate (the high-water mark is reset after loading, and
after quantizing: ``/proc/self/clear_refs``); each against the bf16 weights' bytes; prefill
and decode tokens/s; the bytes decode reads per token and the rate that makes against the
measured bandwidth; and the ratios to transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, NEW = 256, 32
SHARD_BYTES = 2_000_000_000
SIDES = ("ours", "ours-int8", "theirs")


def memory_gb(field: str) -> float:
    """This process's resident memory, GB: "VmRSS" now, "VmHWM" the peak since the start or
    since :func:`reset_peak` (Linux; falls back to ru_maxrss, the peak since the start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak() -> None:
    """Start the peak resident memory (VmHWM) again from the current one (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def bandwidth_gbs() -> float:
    """Memory read bandwidth, GB/s: the best of a few sums of a 1 GiB float32 array (XLA, all
    cores), which is the rate decoding reads its weights at, at best."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 28,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def layer_shapes(config) -> list[tuple[int, int]]:
    """One layer's projections of ``config`` as (out, in) matrices: q, k, v, o, gate, up, down
    (the stored rows with the head axes flattened)."""
    c = config
    heads, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [(heads, c.d_model), (kv, c.d_model), (kv, c.d_model), (c.d_model, heads)] + [
        (c.ffn_dim, c.d_model),
        (c.ffn_dim, c.d_model),
        (c.d_model, c.ffn_dim),
    ]


def matmul_ceiling() -> dict:
    """The prefill's matrix products alone: one layer's projections at M = PROMPT rows, bf16
    weights and activations, XLA's (as our prefill computes them: float32 accumulation) against
    torch's ``F.linear``, best of 5 each. Prefill is these products plus small work, so their
    ratio bounds what prefill can reach against transformers on this CPU."""
    import jax
    import jax.numpy as jnp
    import torch

    from gemma2_lite import get_config

    def best(f) -> float:
        f()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = theirs = flops = 0.0
    for o, i in layer_shapes(get_config("gemma2-2b")):
        x = jnp.ones((PROMPT, i), jnp.bfloat16)
        w = jnp.ones((o, i), jnp.bfloat16)
        dot = jax.jit(
            lambda x, w: jnp.einsum("MD,FD->MF", x, w, preferred_element_type=jnp.float32).astype(
                jnp.bfloat16
            )
        )
        ours += best(lambda: dot(x, w).block_until_ready())  # noqa: B023
        xt, wt = torch.ones(PROMPT, i, dtype=torch.bfloat16), torch.ones(o, i, dtype=torch.bfloat16)
        with torch.no_grad():
            theirs += best(lambda: torch.nn.functional.linear(xt, wt))  # noqa: B023
        flops += 2 * PROMPT * o * i
    return {"ours_gflops": flops / ours / 1e9, "theirs_gflops": flops / theirs / 1e9}


def hf_config(layers: int, vocab: int):
    """transformers' config of gemma-2-2b as released (optionally shallower / smaller vocab)."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        max_position_embeddings=8192,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        dtype="bfloat16",
    )


def write_folder(folder: Path, layers: int, vocab: int) -> int:
    """A released-style HF folder with random bf16 weights, tensor by tensor; returns bytes."""
    import ml_dtypes
    import numpy as np
    import torch
    from transformers import Gemma2ForCausalLM

    from gemma2_lite import get_config
    from gemma2_lite.checkpoint import write_safetensors
    from gemma2_lite.fixtures import released_hf_config

    config = hf_config(layers, vocab)
    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in Gemma2ForCausalLM(config).state_dict().items()
            if k != "lm_head.weight"
        }  # tied to the embedding
    # Plan the shards from the shapes first (file names say "of n"), then draw and write one
    # shard at a time, so at most one shard (<= 2 GB) is ever in memory here.
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(0)
    pools: dict[float, np.ndarray] = {}

    def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
        # Drawing 2.6e9 normals takes minutes on a small CPU; speed does not depend on the
        # values, so each tensor is cut from a pool of 2^22 normals at random offsets.
        if std not in pools:
            pools[std] = (rng.standard_normal(1 << 22, dtype=np.float32) * std).astype(
                ml_dtypes.bfloat16
            )
        pool, n = pools[std], int(np.prod(shape))
        out = np.empty(n, ml_dtypes.bfloat16)
        for at in range(0, n, len(pool) // 2):
            k = min(len(pool) // 2, n - at)
            start = int(rng.integers(0, len(pool) - k + 1))
            out[at : at + k] = pool[start : start + k]
        return out.reshape(shape)

    weight_map, total = {}, 0
    for j, names in enumerate(plan):
        shard = {}
        for name in names:
            shape = shapes[name]
            # Fan-in scaled (embedding rows of norm ~1) so activations stay O(1); norms small.
            shard[name] = draw(shape, 0.1 if name.endswith("norm.weight") else shape[-1] ** -0.5)
        fname = f"model-{j + 1:05d}-of-{len(plan):05d}.safetensors"
        write_safetensors(folder / fname, shard)
        weight_map.update({n: fname for n in names})
        total += sum(a.nbytes for a in shard.values())
        del shard
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    # config.json as the release has it (transformers 4.42's keys), read by both sides.
    ours = get_config("gemma2-2b", vocab_size=vocab, num_layers=layers, param_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(released_hf_config(ours, instruct=False)))
    return total


# ----------------------------------------------------------------------------- the sides
def run_ours(folder: str, prompt: list[int], quantized: bool) -> dict:
    import gc

    import jax
    import jax.numpy as jnp

    from gemma2_lite.checkpoint import load_hf
    from gemma2_lite.quantize import quantize, weight_bytes
    from gemma2_lite.sampler import generate

    start = time.perf_counter()
    model = load_hf(folder, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    load_s, load_rss, load_peak = (
        time.perf_counter() - start,
        memory_gb("VmRSS"),
        memory_gb("VmHWM"),
    )
    quantize_s = 0.0
    if quantized:
        start = time.perf_counter()
        model = quantize(model, "int8")  # the bf16 arrays are dropped here
        gc.collect()
        quantize_s = time.perf_counter() - start
    reset_peak()
    run = lambda n: generate(model, [prompt], max_new_tokens=n)[0]  # noqa: E731
    start = time.perf_counter()
    run(NEW)  # compiles both programs
    compile_s = time.perf_counter() - start
    result = timed(run, "jax " + jax.__version__)
    # Decoding reads every weight once per token, in place: the model's bytes (bf16 or int8).
    return {
        "load_s": load_s + quantize_s,
        "load_rss": load_rss,
        "load_peak": load_peak,
        "compile_s": compile_s,
        "decode_bytes": weight_bytes(model),
        **result,
        "peak_rss": memory_gb("VmHWM"),
    }


def run_theirs(folder: str, prompt: list[int]) -> dict:
    import torch
    import transformers
    from transformers import Gemma2ForCausalLM

    start = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    load_s, load_rss, load_peak = (
        time.perf_counter() - start,
        memory_gb("VmRSS"),
        memory_gb("VmHWM"),
    )
    reset_peak()
    ids = torch.tensor([prompt])

    def run(n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    run(2)  # warm up
    decode_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "load_s": load_s,
        "load_rss": load_rss,
        "load_peak": load_peak,
        "compile_s": 0.0,
        "decode_bytes": decode_bytes,
        **timed(
            run,
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}",
        ),
        "peak_rss": memory_gb("VmHWM"),
    }


REPEATS = 3  # each timing is the best of this many (the least disturbed by other work)


def timed(run, version: str) -> dict:
    def best(n: int) -> tuple[float, list[int]]:
        times, out = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = run(n)
            times.append(time.perf_counter() - start)
        return min(times), out

    t1, _ = best(1)
    t32, tokens = best(NEW)
    return {
        "t1": t1,
        "t32": t32,
        "prefill_tps": PROMPT / t1,
        "decode_tps": (NEW - 1) / max(t32 - t1, 1e-9),
        "tokens": tokens,
        "version": version,
    }


def child(side: str, folder: str, out: str) -> None:
    import numpy as np

    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    prompt = [2] + np.random.default_rng(1).integers(300, vocab, PROMPT - 1).tolist()
    if side == "theirs":
        result = run_theirs(folder, prompt)
    elif side == "bandwidth":
        result = {"bandwidth": bandwidth_gbs()}
    elif side == "matmul":
        result = matmul_ceiling()
    else:
        result = run_ours(folder, prompt, quantized=side == "ours-int8")
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=26, help="26 = the real 2B")
    parser.add_argument("--vocab", type=int, default=256_000, help="256000 = the released HF vocab")
    parser.add_argument("--keep", metavar="DIR", help="write the folder here and keep it")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("SIDE", "FOLDER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    tmp = tempfile.mkdtemp(prefix="gemma2-real-size-")
    folder = Path(args.keep) if args.keep else Path(tmp) / "gemma-2-2b-random"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        weight_bytes = write_folder(folder, args.layers, args.vocab)
        print(
            f"gemma2-2b shape (L={args.layers}, V={args.vocab}), random bf16 weights: "
            f"{weight_bytes / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards, "
            f"written in {time.perf_counter() - start:.0f} s"
        )
        print(
            f"python {platform.python_version()}, {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f}; batch 1, prompt {PROMPT}, {NEW} new tokens, greedy; "
            "default settings (no XLA_FLAGS)"
        )
        results = {}
        for side in ["bandwidth", "matmul"] + args.sides.split(","):
            out = Path(tmp) / f"{side}.json"
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            command = [sys.executable, __file__, "--child", side, str(folder), str(out)]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode:
                killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
                print(
                    f"{side} failed with exit code {proc.returncode}{killed}:\n"
                    f"{proc.stderr[-3000:]}"
                )
                continue
            results[side] = json.loads(out.read_text())
            if "version" in results[side]:
                print(f"  {side}: {results[side]['version']}")
        report(results, weight_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict, weight_bytes: int) -> None:
    bandwidth = results.pop("bandwidth", {}).get("bandwidth")
    if bandwidth:
        print(f"memory bandwidth (read, best of 5 sums of 1 GiB): {bandwidth:.1f} GB/s")
    matmul = results.pop("matmul", None)
    if matmul:
        print(
            f"prefill's products alone (one layer's projections, {PROMPT} rows, bf16): XLA "
            f"{matmul['ours_gflops']:.0f} GFLOP/s, torch {matmul['theirs_gflops']:.0f} GFLOP/s, "
            f"ratio {matmul['ours_gflops'] / matmul['theirs_gflops']:.2f} (the ceiling of "
            "prefill against transformers here)"
        )
    for r in results.values():  # the rate decode reads its weights at
        r["decode_gbs"] = r["decode_bytes"] * r["decode_tps"] / 1e9
        for key in ("load_rss", "load_peak", "peak_rss"):
            r[key + "_x"] = r[key] * 1e9 / weight_bytes
    rows = [
        ("load time, s", "load_s", "{:.1f}"),
        ("compile + first call, s", "compile_s", "{:.1f}"),
        ("RSS after load, GB", "load_rss", "{:.2f}"),
        ("  / weights", "load_rss_x", "{:.2f}"),
        ("peak RSS in load / weights", "load_peak_x", "{:.2f}"),
        ("peak RSS in generate, GB", "peak_rss", "{:.2f}"),
        ("  / weights", "peak_rss_x", "{:.2f}"),
        ("prefill, tokens/s", "prefill_tps", "{:.1f}"),
        ("decode, tokens/s", "decode_tps", "{:.2f}"),
        ("decode reads / token, GB", "decode_bytes", "{:.2f}"),
        ("  read rate, GB/s", "decode_gbs", "{:.1f}"),
    ]
    sides = [s for s in SIDES if s in results]
    ratios = [s for s in ("ours", "ours-int8") if s in results and "theirs" in results]
    print(
        f"\n{'':28s}"
        + "".join(f"{s:>12s}" for s in sides)
        + "".join(f"{s + '/theirs':>20s}" for s in ratios)
    )
    for label, key, fmt in rows:
        values = [results[s][key] / (1e9 if key == "decode_bytes" else 1) for s in sides]
        line = f"{label:28s}" + "".join(f"{fmt.format(v):>12s}" for v in values)
        if key not in ("compile_s", "decode_bytes"):
            line += "".join(
                f"{results[s][key] / results['theirs'][key]:20.2f}"
                for s in ratios
                if results["theirs"][key]
            )
        print(line)
    print(f"weights: {weight_bytes / 1e9:.2f} GB (bf16)")
    if bandwidth:
        for s in sides:
            print(
                f"{s}: decode reads its weights at {results[s]['decode_gbs']:.1f} GB/s, "
                f"{100 * results[s]['decode_gbs'] / bandwidth:.0f}% of the measured bandwidth"
            )
    if "ours" in results and "theirs" in results:
        a, b = results["ours"]["tokens"], results["theirs"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(
            f"greedy tokens agree for the first {same} of {NEW} (random weights in bf16: "
            f"near-ties can flip)"
        )


if __name__ == "__main__":
    main()
