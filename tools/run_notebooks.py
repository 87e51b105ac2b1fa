"""Execute chapters top to bottom on fresh kernels at one profile; print each one's time.

    python tools/run_notebooks.py                       # every chapter at $GEMMA2_LITE_PROFILE
    python tools/run_notebooks.py --profile colab --loop-cap 3 notebooks/02_rope.ipynb

``make colab-check`` runs the whole ``colab`` profile this way on a CPU, with loops capped
(``GEMMA2_LITE_LOOP_CAP``: training steps and repetitions shortened, every shape the profile's).
Executed copies go to ``_build/executed-<profile>/`` (never into notebooks/, which is committed
without outputs) and a summary table to ``_build/executed-<profile>/times.md``. Exit status 1
when any chapter fails; the failing cell's error is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, out_dir: Path, timeout: int) -> tuple[float, str]:
    """Execute one notebook in a fresh kernel (cwd notebooks/); return (seconds, error or '')."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as err:
        error = str(err)
    except Exception as err:  # a timeout or a dead kernel: report it, go on with the next
        error = f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    nbformat.write(nb, out_dir / path.name)
    return seconds, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="default: every notebooks/NN_*.ipynb")
    parser.add_argument("--profile", help="sets GEMMA2_LITE_PROFILE for the kernels")
    parser.add_argument("--loop-cap", type=int, help="sets GEMMA2_LITE_LOOP_CAP for the kernels")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.profile:
        os.environ["GEMMA2_LITE_PROFILE"] = args.profile
    if args.loop_cap:
        os.environ["GEMMA2_LITE_LOOP_CAP"] = str(args.loop_cap)
    sys.path.insert(0, str(ROOT))
    from gemma2_lite.profile import get_profile, loop_cap

    profile = get_profile()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
    out_dir = ROOT / "_build" / f"executed-{profile}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cap = loop_cap()
    print(f"profile={profile}, loops capped at {cap}" if cap else f"profile={profile}", flush=True)
    rows, failed, total = [], 0, 0.0
    for path in paths:
        seconds, error = run(path.resolve(), out_dir, args.timeout)
        status = "FAILED" if error else "ok"
        failed += bool(error)
        total += seconds
        print(f"{path.name:40s} {seconds:7.0f} s  {status}", flush=True)
        if error:
            print(error[-3000:], flush=True)
        rows.append(f"| {path.stem} | {seconds:.0f} | {status} |")
    table = ["| chapter | seconds | result |", "|---|---:|---|", *rows, f"| all | {total:.0f} | |"]
    (out_dir / "times.md").write_text(
        f"profile={profile}, loop cap {cap}\n\n" + "\n".join(table) + "\n")
    print(f"total {total:.0f} s; {failed} failed; table in {out_dir / 'times.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
