"""Where the package finds its files, installed or in a checkout: every path lookup is here.

Two kinds of file:

* **Shipped with the package** (package data, in ``gemma2_lite/assets/``; the wheel holds
  them, so ``pip install .`` works from any folder):

  ==================== =============================================================
  ``tokenizer.model``  the book's SentencePiece tokenizer (V = 4096), 61 KB
  ``tiny-model/``      the book's trained ``tiny`` Gemma 2 (Hugging Face layout), 6 MB
  ``shakespeare.jsonl`` the corpus both were trained on (train and valid splits), 5 MB
  ``eval/``            chapter 08d's evaluation sets, 295 KB
  ``tiny-model-sft/``  LoRA SFT adapters of the book's model, seeds 0-2 (PEFT layout), 1.1 MB
  ==================== =============================================================

  The corpus ships (about 2 MB of the wheel, compressed) because public functions read it:
  :mod:`gemma2_lite.data`, the instruction set of :mod:`gemma2_lite.posttrain`, retraining
  the tokenizer, and the release-layout fixtures that :func:`gemma2_lite.weights.locate`
  falls back on, whose tokenizer is trained on its first characters. Each file is in git
  once, here; ``data/README.md`` in the repository says where each came from and how to
  rebuild it, and ``assets/README.md`` carries the licence notes into the wheel.

* **The book's working files**, written by its programs: results and caches of the
  experiments (``results/``) and the recorded ablations (``data/ablations/``). They live
  in the source checkout this package runs from (:func:`checkout`); installed without one,
  under the current working folder instead, so nothing is ever written into
  ``site-packages``.

A shipped file that is missing (a damaged install, a file deleted from the checkout) is
reported by :func:`require`, naming the file and how to get it back.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ASSETS",
    "SHIPPED",
    "MissingDataError",
    "asset",
    "tokenizer_file",
    "book_model_dir",
    "sft_adapters_dir",
    "corpus_file",
    "require",
    "checkout",
    "work_dir",
    "data_path",
    "repo_root",
    "shown",
]

#: The folder of shipped files inside the installed package.
ASSETS = Path(__file__).resolve().parent / "assets"
#: Every shipped file or folder, and what it is (for messages).
SHIPPED = {
    "tokenizer.model": "the book's tokenizer",
    "tiny-model": "the book's small model",
    "shakespeare.jsonl": "the book's corpus",
    "eval": "the book's evaluation sets",
    "tiny-model-sft": "the SFT adapters of the book's model (chapters 08b, 08c)",
}


class MissingDataError(FileNotFoundError):
    """A file the package ships is not there; the message names it and how to restore it."""


def asset(name: str) -> Path:
    """The path of the shipped file or folder ``name`` (one of :data:`SHIPPED`).

    Not checked: writers (``train-tiny``, ``tokenizer train``) use it as their default
    target. Readers call :func:`require`.
    """
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a file the package ships; those are {sorted(SHIPPED)}")
    return ASSETS / name


def tokenizer_file() -> Path:
    """The book's tokenizer, ``gemma2_lite/assets/tokenizer.model``."""
    return asset("tokenizer.model")


def book_model_dir() -> Path:
    """The book's small model, ``gemma2_lite/assets/tiny-model/`` (Hugging Face layout)."""
    return asset("tiny-model")


def sft_adapters_dir(seed: int = 0) -> Path:
    """The shipped LoRA SFT adapters of the book's model for ``seed`` (0, 1 or 2),
    ``gemma2_lite/assets/tiny-model-sft/seed-{seed}/`` (Hugging Face PEFT layout)."""
    return asset("tiny-model-sft") / f"seed-{int(seed)}"


def corpus_file() -> Path:
    """The corpus, ``gemma2_lite/assets/shakespeare.jsonl``."""
    return asset("shakespeare.jsonl")


def require(path: Path, need: str | None = None) -> Path:
    """``path`` (a shipped file or folder) after checking it is there.

    ``need`` is a file inside a folder that must exist too (``"config.json"``). Raises
    :class:`MissingDataError` naming what is missing and how to restore it: the file is
    part of the package, so the fix is to restore or reinstall it, never to rebuild it.
    """
    target = path / need if need else path
    if target.exists():
        return path
    what = SHIPPED.get(path.name, "a file of the package")
    place = checkout()
    if place is not None:
        relative = path.relative_to(place) if path.is_relative_to(place) else path
        fix = f"restore it with `git checkout -- {relative}` in {place}"
    else:
        fix = "reinstall the package (pip install --force-reinstall gemma2-lite)"
    raise MissingDataError(
        f"{what} is missing: {target} is not there. It ships with gemma2-lite; {fix}"
    )


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as ``gemma2_lite/assets/...`` when it lies inside the package, else as given:
    the same text on every machine, installed or in a checkout (what reprs and the rendered
    book show)."""
    root = Path(__file__).resolve().parent.parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def checkout() -> Path | None:
    """The source checkout this package is imported from, or ``None`` when it is installed.

    A checkout is the folder above the package holding ``pyproject.toml`` and ``notebooks/``
    (an editable install, or the repository on ``sys.path``); an installed package sits in
    ``site-packages`` with neither beside it.
    """
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def work_dir() -> Path:
    """Where the book's programs keep their working files: :func:`checkout`, else the current
    working folder."""
    return checkout() or Path.cwd()


def repo_root() -> Path:
    """Former name of :func:`work_dir` (kept importable from :mod:`gemma2_lite.profile`)."""
    return work_dir()


def data_path(*parts: str) -> Path:
    """A file by its name under the book's ``data/`` folder: a shipped file from the package
    (``data_path("tokenizer.model")``), anything else from ``data/`` in :func:`work_dir`
    (``data_path("ablations")``). Prefer the named functions above in new code."""
    if parts and parts[0] in SHIPPED:
        return asset(parts[0]).joinpath(*parts[1:])
    return work_dir() / "data" / os.path.join(*parts) if parts else work_dir() / "data"
