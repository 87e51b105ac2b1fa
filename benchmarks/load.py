"""Loading a bf16 Hugging Face checkpoint: time and peak memory, ours next to transformers.

    python benchmarks/load.py                        # gemma2-2b width, 4 layers (~1.8 GB)
    python benchmarks/load.py --layers 2 --vocab 32000 --repeat 1   # a quick smoke run

Writes (once, into ``--folder``) a released-style folder with random bf16 weights by
``benchmarks/real_size.py``'s writer, then loads it ``--repeat`` times per side, the sides
taking turns, each load in a fresh subprocess so that its peak resident memory is its own:
``gemma2_lite.checkpoint.load_hf(folder, jnp.bfloat16)`` and
``Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)``. transformers maps the
files and reads nothing until the weights are used, while our load reads every weight once
(to check its values; it is used in place, not copied), so a third side, "theirs+read", is
``from_pretrained`` followed by reading every weight once (a chunked check of the exponent
bits, as ours): the same work; and a fourth, "ours-unchecked", is ``load_hf(...,
check_values=False)``, which reads no weight either (everything but the values still checked).
The load time is the call itself (imports excluded); peak memory
is the process's own high-water mark after the call (``VmHWM``, imports included; not
``ru_maxrss``, which Linux carries over from the parent across the spawn, so a child of a big
parent would report the parent's size), also shown against the weights' bytes.
Prints the best and the median of each, and the ratios; then the floor of a checked load on
this machine: the unchecked load plus the weights' bytes at the measured memory bandwidth.

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
if side.startswith("ours"):
    import jax, jax.numpy as jnp
    from gemma2_lite.checkpoint import load_hf
    start = time.perf_counter()
    model = load_hf(folder, jnp.bfloat16, check_values=side == "ours")
    jax.block_until_ready(jax.tree.leaves(model))
else:
    import torch
    from transformers import Gemma2ForCausalLM
    start = time.perf_counter()
    model = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if side == "theirs+read":     # what our load also does: read every weight once, checking
        for p in model.parameters():    # its exponent bits (bf16: all ones = inf or NaN)
            for c in p.detach().view(-1).view(torch.int16).split(1 << 23):
                assert int((c & 0x7F80).max()) != 0x7F80
seconds = time.perf_counter() - start
try:      # this process's own peak: ru_maxrss would include its parent's at the spawn
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # macOS: bytes
    peak *= 1 if sys.platform == "darwin" else 1024                     # else KiB
print(json.dumps({"load_s": seconds, "peak_bytes": peak}))
"""


def measure(folder: str | Path, side: str) -> dict[str, float]:
    """One load of ``folder`` by ``side`` ("ours", "ours-unchecked", "theirs" or "theirs+read")
    in a fresh subprocess:
    ``{"load_s": seconds of the load call, "peak_bytes": the process's peak RSS}``."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, side, str(folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def weight_bytes(folder: Path) -> int:
    index = folder / "model.safetensors.index.json"
    return int(json.loads(index.read_text())["metadata"]["total_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="where the checkpoint is (written there if absent; default: a "
        "temporary folder, removed afterwards)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from real_size import write_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "ckpt"
        if not (folder / "model.safetensors.index.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            print(
                f"writing {args.layers} layers, vocabulary {args.vocab}, into {folder}", flush=True
            )
            write_folder(folder, args.layers, args.vocab)
        size = weight_bytes(folder)
        runs: dict[str, list[dict[str, float]]] = {
            "ours": [],
            "ours-unchecked": [],
            "theirs": [],
            "theirs+read": [],
        }
        for _ in range(args.repeat):
            for side in runs:
                runs[side].append(measure(folder, side))
                print(side, runs[side][-1], flush=True)
        report(runs, size, bandwidth())
    return 0


def bandwidth() -> float:
    """The machine's memory read bandwidth, GB/s (``real_size.bandwidth_gbs``, in a child
    process so that this one stays small)."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import real_size; "
    code += "print(real_size.bandwidth_gbs())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def report(runs: dict[str, list[dict[str, float]]], size: int, gbs: float | None = None) -> None:
    print(f"\nweights: {size / 1e9:.2f} GB (bf16); {len(runs['ours'])} load(s) per side")
    sides = ("ours", "ours-unchecked", "theirs", "theirs+read")
    head = "".join(f"{s:>15}" for s in sides)
    print(f"{'':24}{head}{'ours/theirs':>13}{'unchecked/theirs':>18}{'ours/theirs+read':>18}")
    for key, unit, scale in (("load_s", "s", 1.0), ("peak_bytes", "GB", 1e9)):
        for name, pick in (("best", min), ("median", statistics.median)):
            ours, free, theirs, read = (pick(r[key] for r in runs[s]) / scale for s in sides)
            label = f"{'load time' if key == 'load_s' else 'peak RSS'} ({name}, {unit})"
            cells = "".join(f"{v:15.2f}" for v in (ours, free, theirs, read))
            print(f"{label:24}{cells}{ours / theirs:13.2f}{free / theirs:18.2f}{ours / read:18.2f}")
    peaks = (min(r["peak_bytes"] for r in runs[s]) / size for s in sides)
    print(f"{'peak RSS / weights':24}" + "".join(f"{v:15.2f}" for v in peaks))
    if gbs:
        # A check reads every byte once: at best at the machine's bandwidth, after the rest of
        # the load (the unchecked one).
        free, theirs = (min(r["load_s"] for r in runs[s]) for s in ("ours-unchecked", "theirs"))
        floor = free + size / 1e9 / gbs
        print(
            f"\nmeasured bandwidth {gbs:.1f} GB/s: reading the weights once takes at least "
            f"{size / 1e9 / gbs:.2f} s, so a checked load here takes at least {floor:.2f} s "
            f"({floor / theirs:.2f}x transformers' lazy load)"
        )


if __name__ == "__main__":
    sys.exit(main())
