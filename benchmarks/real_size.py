"""Gemma 2 2B at its real size on the CPU: memory and speed, ours next to transformers.

    python benchmarks/real_size.py                     # the real 2B (~10 min, ~17 GB of RAM)
    python benchmarks/real_size.py --layers 2 --vocab 32000   # a quick smoke run

1. Writes the gemma2-2b configuration with random bf16 weights as a released Hugging Face
   folder holds it (vocab 256000, bf16 shards of <= 2 GB + index, a transformers-4.42
   config.json). Tensor names and shapes come from transformers' own ``Gemma2ForCausalLM``
   built on the meta device, so the tensors do not depend on our writer.
2. Runs each side in its own subprocess, so each one's peak resident memory is its own:
   ``gemma2_lite.checkpoint.load_hf`` + ``gemma2_lite.sampler.generate``, and
   ``Gemma2ForCausalLM.from_pretrained(dtype=bfloat16)`` + ``generate`` (eager attention),
   both reading the same folder, so both hold the same weights.
3. Each side prefills a 256-token prompt and greedily decodes 32 tokens, batch 1, bf16.
   Prefill speed = 256 / time(1 new token); decode speed = 31 / (time(32) - time(1)).
   Our programs are compiled by a first, untimed call (the compile time is printed apart).

Prints load time, peak resident memory (``ru_maxrss``) against the weights' bytes, tokens/s
for prefill and decode, and the ratios ours / theirs.

On the CPU, XLA computes bf16 matmuls in float32, and by default its loop-invariant code
motion hoists those conversions out of the decode ``while_loop``: a float32 copy of every
weight is kept for the whole loop. Measured here: the while-loop program's peak was ~5.8x the
bf16 weights (4 layers at full width and vocabulary), and the real 2B was OOM-killed at
20.5 GB on a 24 GB machine. With that one pass disabled the peak stays near the load's
(~3.2x, same speed). So our side runs with ``XLA_FLAGS=--xla_disable_hlo_passes=
while-loop-invariant-code-motion`` unless ``--xla-default`` is given.
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
NO_HOIST = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
SHARD_BYTES = 2_000_000_000


def rss_gb() -> float:
    """Peak resident set size of this process so far, GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def hf_config(layers: int, vocab: int):
    """transformers' config of gemma-2-2b as released (optionally shallower / smaller vocab)."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                        max_position_embeddings=8192, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, dtype="bfloat16")


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
        shapes = {k: tuple(v.shape) for k, v in Gemma2ForCausalLM(config).state_dict().items()
                  if k != "lm_head.weight"}                            # tied to the embedding
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
            pools[std] = (rng.standard_normal(1 << 22, dtype=np.float32) * std
                          ).astype(ml_dtypes.bfloat16)
        pool, n = pools[std], int(np.prod(shape))
        out = np.empty(n, ml_dtypes.bfloat16)
        for at in range(0, n, len(pool) // 2):
            k = min(len(pool) // 2, n - at)
            start = int(rng.integers(0, len(pool) - k + 1))
            out[at:at + k] = pool[start:start + k]
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
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    # config.json as the release has it (transformers 4.42's keys), read by both sides.
    ours = get_config("gemma2-2b", vocab_size=vocab, num_layers=layers, param_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(released_hf_config(ours, instruct=False)))
    return total


# ----------------------------------------------------------------------------- the two sides
def run_ours(folder: str, prompt: list[int]) -> dict:
    import jax
    import jax.numpy as jnp

    from gemma2_lite.checkpoint import load_hf
    from gemma2_lite.sampler import generate

    start = time.perf_counter()
    model = load_hf(folder, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    load_s, load_rss = time.perf_counter() - start, rss_gb()
    run = lambda n: generate(model, [prompt], max_new_tokens=n)[0]   # noqa: E731
    start = time.perf_counter()
    run(1)                                # compiles both programs (same sizes for n=1 and n=32)
    compile_s = time.perf_counter() - start
    return {"load_s": load_s, "load_rss": load_rss, "compile_s": compile_s,
            **timed(run, "jax " + jax.__version__)}


def run_theirs(folder: str, prompt: list[int]) -> dict:
    import torch
    import transformers
    from transformers import Gemma2ForCausalLM

    start = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                              attn_implementation="eager").eval()
    load_s, load_rss = time.perf_counter() - start, rss_gb()
    ids = torch.tensor([prompt])

    def run(n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, use_cache=True,
                                 pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return {"load_s": load_s, "load_rss": load_rss, "compile_s": 0.0,
            **timed(run, f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                         f"transformers {transformers.__version__}")}


def timed(run, version: str) -> dict:
    start = time.perf_counter()
    run(1)
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    tokens = run(NEW)
    t32 = time.perf_counter() - start
    return {"t1": t1, "t32": t32, "prefill_tps": PROMPT / t1,
            "decode_tps": (NEW - 1) / max(t32 - t1, 1e-9), "tokens": tokens,
            "peak_rss": rss_gb(), "version": version}


def child(side: str, folder: str, out: str) -> None:
    import numpy as np

    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    prompt = [2] + np.random.default_rng(1).integers(300, vocab, PROMPT - 1).tolist()
    result = (run_ours if side == "ours" else run_theirs)(folder, prompt)
    Path(out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=26, help="26 = the real 2B")
    parser.add_argument("--vocab", type=int, default=256_000, help="256000 = the released HF vocab")
    parser.add_argument("--keep", metavar="DIR", help="write the folder here and keep it")
    parser.add_argument("--xla-default", action="store_true",
                        help=f"run our side without {NO_HOIST} (needs ~6x the weights' bytes)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "FOLDER", "OUT"),
                        help=argparse.SUPPRESS)
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
        print(f"gemma2-2b shape (L={args.layers}, V={args.vocab}), random bf16 weights: "
              f"{weight_bytes / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards, "
              f"written in {time.perf_counter() - start:.0f} s")
        print(f"python {platform.python_version()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; batch 1, prompt {PROMPT}, {NEW} new tokens, greedy")
        results = {}
        for side in ("ours", "theirs"):
            out = Path(tmp) / f"{side}.json"
            env = dict(os.environ)
            if side == "ours" and not args.xla_default:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_HOIST}".strip()
            command = [sys.executable, __file__, "--child", side, str(folder), str(out)]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode:
                killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
                print(f"{side} failed with exit code {proc.returncode}{killed}:\n"
                      f"{proc.stderr[-3000:]}")
                continue
            results[side] = json.loads(out.read_text())
            flags = env.get("XLA_FLAGS") if side == "ours" else None
            flags = f", XLA_FLAGS={flags}" if flags else ""
            print(f"  {side}: {results[side]['version']}{flags}")
        report(results, weight_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict, weight_bytes: int) -> None:
    rows = [("load time, s", "load_s", "{:.1f}"), ("compile time, s", "compile_s", "{:.1f}"),
            ("RSS after load, GB", "load_rss", "{:.2f}"), ("peak RSS, GB", "peak_rss", "{:.2f}"),
            ("peak RSS / weights", None, "{:.2f}"),
            ("prefill, tokens/s", "prefill_tps", "{:.1f}"),
            ("decode, tokens/s", "decode_tps", "{:.2f}")]
    sides = [s for s in ("ours", "theirs") if s in results]
    print(f"\n{'':22s}" + "".join(f"{s:>12s}" for s in sides)
          + ("   ours/theirs" if len(sides) == 2 else ""))
    for label, key, fmt in rows:
        values = [results[s][key] if key else results[s]["peak_rss"] * 1e9 / weight_bytes
                  for s in sides]
        line = f"{label:22s}" + "".join(f"{fmt.format(v):>12s}" for v in values)
        if len(sides) == 2 and key not in ("compile_s",) and values[1]:
            line += f"   {values[0] / values[1]:12.2f}"
        print(line)
    print(f"weights: {weight_bytes / 1e9:.2f} GB (bf16)")
    if len(sides) == 2:
        a, b = results["ours"]["tokens"], results["theirs"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"greedy tokens agree for the first {same} of {NEW} (random weights in bf16: "
              f"near-ties can flip)")


if __name__ == "__main__":
    main()
