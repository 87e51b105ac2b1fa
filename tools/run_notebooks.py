"""Execute chapters top to bottom on fresh kernels at one profile; print each one's time.

    python tools/run_notebooks.py                       # every chapter at $GEMMA2_LITE_PROFILE
    python tools/run_notebooks.py --profile colab --loop-cap 3 notebooks/02_rope.ipynb

``make colab-check`` runs the whole ``colab`` profile this way on a CPU, with loops capped
(``GEMMA2_LITE_LOOP_CAP``: training steps and repetitions shortened, every shape the profile's).
Executed copies go to ``_build/executed-<profile>/`` (never into notebooks/, which is committed
without outputs) and a summary table to ``_build/executed-<profile>/times.md``. Exit status 1
when any chapter fails; the failing cell's error is printed.

``--record`` also writes each chapter that ran without error into ``book/run-times.json``, the
record the book's run-time tables are made from (the instructor notes render it; the README's
table is regenerated from it by ``python tools/course_pages.py --write``), with the date, the
machine and the load average before and after the chapter, so every number says where it came
from. A chapter not run keeps its earlier entry.
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
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
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


def _machine() -> str:
    """'N cores, CPU model' of this machine (Linux), else the platform's name."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(
            l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores, {model}"


def record_time(
    chapter: str, profile: str, cap: int | None, seconds: float, load: tuple[float, float]
) -> None:
    """Write one chapter's time into book/run-times.json (key: profile, plus the loop cap)."""
    import datetime
    import json

    path = ROOT / "book" / "run-times.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    key = f"{profile}, loops capped at {cap}" if cap else profile
    record.setdefault(key, {})[chapter] = {
        "seconds": round(seconds),
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "load average": [round(load[0], 1), round(load[1], 1)],
        "by": "tools/run_notebooks.py --record",
    }
    record[key] = dict(sorted(record[key].items()))
    path.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb"
    )
    parser.add_argument("--profile", help="sets GEMMA2_LITE_PROFILE for the kernels")
    parser.add_argument("--loop-cap", type=int, help="sets GEMMA2_LITE_LOOP_CAP for the kernels")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the times into book/run-times.json (see the docstring)",
    )
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
        load_before = os.getloadavg()[0]
        seconds, error = run(path.resolve(), out_dir, args.timeout)
        if args.record and not error:
            record_time(path.stem, profile, cap, seconds, (load_before, os.getloadavg()[0]))
        status = "FAILED" if error else "ok"
        failed += bool(error)
        total += seconds
        print(f"{path.name:40s} {seconds:7.0f} s  {status}", flush=True)
        if error:
            print(error[-3000:], flush=True)
        rows.append(f"| {path.stem} | {seconds:.0f} | {status} |")
    table = ["| chapter | seconds | result |", "|---|---:|---|", *rows, f"| all | {total:.0f} | |"]
    (out_dir / "times.md").write_text(
        f"profile={profile}, loop cap {cap}\n\n" + "\n".join(table) + "\n"
    )
    print(f"total {total:.0f} s; {failed} failed; table in {out_dir / 'times.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
