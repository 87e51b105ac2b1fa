"""Loading a bf16 Hugging Face checkpoint: time and peak memory, ours next to transformers.

    python benchmarks/load.py                        # gemma2-2b width, 4 layers (~1.8 GB)
    python benchmarks/load.py --layers 2 --vocab 32000 --repeat 1   # a quick smoke run

Writes (once, into ``--folder``) a released-style folder with random bf16 weights by
``benchmarks/real_size.py``'s writer, then loads it ``--repeat`` times per side, the sides
taking turns, each load in a fresh subprocess so that its peak resident memory is its own:
``gemma2_lite.checkpoint.load_hf(folder, jnp.bfloat16)`` and
``Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)``. The load time is the
call itself (imports excluded); peak memory is the process's ``ru_maxrss`` after the call
(imports included), also shown against the weights' bytes. Prints the best and the median of
each, and the ratios ours / theirs.

:func:`measure` is the one-load measurement, for other benchmarks to call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = """
import json, resource, sys, time
side, folder = sys.argv[1], sys.argv[2]
if side == "ours":
    import jax, jax.numpy as jnp
    from gemma2_lite.checkpoint import load_hf
    start = time.perf_counter()
    model = load_hf(folder, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
else:
    import torch
    from transformers import Gemma2ForCausalLM
    start = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # Linux: KiB
print(json.dumps({"load_s": seconds, "peak_bytes": peak}))
"""


def measure(folder: str | Path, side: str) -> dict[str, float]:
    """One load of ``folder`` by ``side`` ("ours" or "theirs") in a fresh subprocess:
    ``{"load_s": seconds of the load call, "peak_bytes": the process's peak RSS}``."""
    out = subprocess.run([sys.executable, "-c", _CHILD, side, str(folder)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def weight_bytes(folder: Path) -> int:
    index = folder / "model.safetensors.index.json"
    return int(json.loads(index.read_text())["metadata"]["total_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the checkpoint is (written there if absent; default: a "
                             "temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from real_size import write_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "ckpt"
        if not (folder / "model.safetensors.index.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            print(f"writing {args.layers} layers, vocabulary {args.vocab}, into {folder}",
                  flush=True)
            write_folder(folder, args.layers, args.vocab)
        size = weight_bytes(folder)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "theirs": []}
        for _ in range(args.repeat):
            for side in runs:
                runs[side].append(measure(folder, side))
                print(side, runs[side][-1], flush=True)
        report(runs, size)
    return 0


def report(runs: dict[str, list[dict[str, float]]], size: int) -> None:
    print(f"\nweights: {size / 1e9:.2f} GB (bf16); {len(runs['ours'])} load(s) per side")
    print(f"{'':26}{'ours':>10}{'transformers':>14}{'ours / theirs':>15}")
    rows = {}
    for key, unit, scale in (("load_s", "s", 1.0), ("peak_bytes", "GB", 1e9)):
        for name, pick in (("best", min), ("median", statistics.median)):
            ours = pick(r[key] for r in runs["ours"]) / scale
            theirs = pick(r[key] for r in runs["theirs"]) / scale
            rows[(key, name)] = ours, theirs
            label = f"{'load time' if key == 'load_s' else 'peak RSS'} ({name}, {unit})"
            print(f"{label:26}{ours:10.2f}{theirs:14.2f}{ours / theirs:15.2f}")
    ours, theirs = rows[("peak_bytes", "best")]
    print(f"{'peak RSS / weights':26}{ours * 1e9 / size:10.2f}{theirs * 1e9 / size:14.2f}")


if __name__ == "__main__":
    sys.exit(main())
