"""Write the tiny release-layout checkpoints (:mod:`gemma2_lite.fixtures`) into a folder.

    python -m gemma2_lite.book.fixtures OUT_DIR [--names gemma-2-2b-it]

Errors follow :mod:`gemma2_lite.cmdline`'s policy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Only the standard library at the top: JAX loads inside run(), where Ctrl-C is handled.
from gemma2_lite.cmdline import Parser, run, utf8_argument

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gemma2_lite.book.fixtures OUT_DIR``; returns the exit status."""
    return run(_main, None if argv is None else list(argv))


def _main(argv: list[str] | None) -> int:
    from gemma2_lite.fixtures import FIXTURE_NAMES, write_fixtures
    from gemma2_lite.release import model_dir

    parser = Parser(
        prog="python -m gemma2_lite.book.fixtures",
        description="Write tiny Gemma 2 checkpoints in the released layouts (HF and Orbax).",
    )
    parser.add_argument("out_dir", help="folder to write into (created if needed)")
    parser.add_argument(
        "--names",
        nargs="+",
        default=list(FIXTURE_NAMES),
        choices=FIXTURE_NAMES,
        help="which models (default: all)",
    )
    args = parser.parse_args(argv)
    out = write_fixtures(utf8_argument(args.out_dir, "OUT_DIR"), args.names)
    for name in args.names:
        for layout in ("hf", "flax"):
            folder = model_dir(name, layout, out)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            print(f"{folder}  ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
