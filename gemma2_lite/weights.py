"""Getting the released Gemma 2 weights: one folder, one environment variable, one function.

Every chapter that runs the real model finds its files the same way::

    from gemma2_lite.weights import locate
    w = locate("gemma-2-2b")            # prints what it runs on: real weights or the fixture
    model, tok = w.load(), w.tokenizer()

The weights live in one folder, ``$GEMMA2_LITE_WEIGHTS`` (default
``~/.cache/gemma2-lite/weights``), one subfolder per model and layout, exactly as the
publishers serve them::

    $GEMMA2_LITE_WEIGHTS/
      gemma-2-2b-it/
        hf/     config.json, tokenizer.model, model.safetensors.index.json,
                model-00001-of-0000n.safetensors ...        (huggingface.co/google/gemma-2-2b-it)
        flax/   tokenizer.model, gemma2-2b-it/ (the Orbax checkpoint)
                                            (kaggle.com/models/google/gemma-2, variant flax)

:func:`pretrained` returns such a folder after checking that its files are there and intact
(:func:`folder_problems`: every shard present, the index valid, checksums where save_hf wrote
them). When they are not, and ``huggingface_hub`` (Hugging Face layout) or ``kagglehub``
(Flax layout) is installed (``pip install 'gemma2-lite[weights]'``) and the network is
allowed, it downloads them through that client, after saying which licence to accept and
which token to set; otherwise it raises :class:`WeightsNotFound` saying where to put which
files (:class:`BrokenWeights` naming each problem when they are there but damaged).

:func:`locate` is what the chapters call: the real files when they are present (a folder
that is there but broken is an error naming what is wrong, never a quiet fallback); at the
``ci`` profile, when they are absent, the release-layout fixtures of :mod:`gemma2_lite.fixtures`
(tiny random weights in the released layouts, written once into a temporary folder); at the
``colab`` and ``full`` profiles, :func:`pretrained` (which downloads or explains). It prints
which of the two it found, and the :class:`Weights` it returns says it again
(``w.is_real``), so a reader never mistakes the fixture's random text for Gemma's.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fixtures
from .flax_checkpoint import is_orbax_checkpoint, load_flax
from .hf_checkpoint import INDEX_FILE, SINGLE_FILE, load_hf, read_index, verify_hf_folder
from .profile import get_profile
from .release import (
    ENV_VAR,
    FIXTURE_MARKER,
    LAYOUTS,
    MODELS,
    check_model,
    flax_checkpoint_name,
    model_dir,
    weights_root,
)
from .safetensors_io import CheckpointError

__all__ = [
    "ENV_VAR",
    "MODELS",
    "LAYOUTS",
    "FIXTURE_MARKER",
    "WeightsNotFound",
    "BrokenWeights",
    "Weights",
    "weights_root",
    "model_dir",
    "flax_checkpoint_name",
    "missing_files",
    "folder_problems",
    "pretrained",
    "locate",
    "book_model",
]

_HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
)


class WeightsNotFound(FileNotFoundError):
    """The weights are not on disk and could not be downloaded; the message says what to do."""


class BrokenWeights(WeightsNotFound):
    """The weights folder is there but incomplete or damaged; the message names each problem."""


def missing_files(path: str | os.PathLike, name: str, layout: str = "hf") -> list[str]:
    """The files a complete ``name``/``layout`` folder needs that ``path`` lacks ([]: none)."""
    check_model(name, layout)
    path = Path(path)
    missing = [
        f
        for f in ("tokenizer.model",) + (("config.json",) if layout == "hf" else ())
        if not (path / f).is_file()
    ]
    if layout == "flax":
        if not is_orbax_checkpoint(path / flax_checkpoint_name(name)):
            missing.append(f"{flax_checkpoint_name(name)}/ (the Orbax checkpoint directory)")
        return missing
    if (path / INDEX_FILE).is_file():
        try:
            shards = sorted(set(read_index(path).values()))
        except CheckpointError as exc:
            return missing + [f"a valid {INDEX_FILE} ({exc})"]
        missing += [s for s in shards if not (path / s).is_file()]
    elif not (path / SINGLE_FILE).is_file():
        missing.append(f"{INDEX_FILE} and the model-*.safetensors shards it lists")
    return missing


def folder_problems(path: str | os.PathLike, name: str, layout: str = "hf") -> list[str]:
    """What is wrong with ``path`` as the ``name``/``layout`` folder ([]: complete and intact).

    Missing files first (named). Then, for the hf layout, the checkpoint itself, without
    loading it (:func:`gemma2_lite.hf_checkpoint.verify_hf_folder`): config.json, the index,
    every shard's header and contents against the index and the config, and where save_hf
    wrote the folder, every file's sha256 against its manifest.
    """
    missing = missing_files(path, name, layout)
    if missing:
        return [f"missing {m}" for m in missing]
    return verify_hf_folder(path) if layout == "hf" else []


def _broken(name: str, layout: str, target: Path, problems: list[str]) -> BrokenWeights:
    return BrokenWeights(
        f"{name} ({layout} layout) in {target} is incomplete or damaged:\n  "
        + "\n  ".join(problems)
        + f"\n  Repair or remove that folder (the fixture stands in only when it is absent), "
        f"or point {ENV_VAR} elsewhere."
    )


def _source(name: str, layout: str) -> tuple[str, str, str]:
    """(page whose licence to accept, credentials to set, client package) for a download."""
    if layout == "hf":
        return (
            f"https://huggingface.co/google/{name}",
            "HF_TOKEN (a read token from https://huggingface.co/settings/tokens; or run "
            "`huggingface-cli login`)",
            "huggingface_hub",
        )
    return (
        "https://www.kaggle.com/models/google/gemma-2",
        "KAGGLE_USERNAME and KAGGLE_KEY (Kaggle > Settings > API > Create New Token; or "
        "put kaggle.json in ~/.kaggle/)",
        "kagglehub",
    )


def _instructions(name: str, layout: str, target: Path, missing: list[str]) -> str:
    page, token, client = _source(name, layout)
    files = (
        "config.json, tokenizer.model, model.safetensors.index.json and the "
        "model-*.safetensors shards it lists"
        if layout == "hf"
        else f"tokenizer.model and the Orbax checkpoint directory {flax_checkpoint_name(name)}/"
    )
    return (
        f"{name} ({layout} layout) is not in {target}"
        f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}.\n"
        f"  Put {files} there, from {page}\n"
        f"  (accept the Gemma Terms of Use on that page first), or point {ENV_VAR} at a "
        f"folder holding {name}/{layout}/.\n"
        f"  To download automatically: pip install 'gemma2-lite[weights]' (installs "
        f"{client}), accept the licence at {page}, set {token}, and call "
        f"pretrained({name!r}, layout={layout!r}) with the network available."
    )


def _download_hf(name: str, target: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=f"google/{name}", local_dir=target, allow_patterns=list(_HF_FILES))


def _download_kaggle(name: str, target: Path) -> None:
    import kagglehub

    # kagglehub keeps its own cache; the weights folder gets a link to it (no second copy).
    source = Path(kagglehub.model_download(f"google/gemma-2/flax/{flax_checkpoint_name(name)}"))
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        shutil.copytree(source, target, dirs_exist_ok=True)  # complete a partial folder
        return
    if target.is_symlink() or target.is_dir():
        target.unlink() if target.is_symlink() else target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=True)


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "GEMMA2_LITE_OFFLINE")
    )


def pretrained(name: str, layout: str = "hf", *, download: bool = True) -> Path:
    """The local folder of the released ``name`` in ``layout``, downloading it if allowed.

    Args:
      name: one of :data:`MODELS`, e.g. ``"gemma-2-2b"`` or ``"gemma-2-2b-it"``.
      layout: ``"hf"`` (Hugging Face: ``config.json`` + bf16 safetensors shards + index) or
        ``"flax"`` (Kaggle: the official Orbax checkpoint directory + ``tokenizer.model``).
      download: when the files are absent, fetch them with ``huggingface_hub`` / ``kagglehub``
        (if installed, and unless ``HF_HUB_OFFLINE`` or ``GEMMA2_LITE_OFFLINE`` is set).

    Returns:
      :func:`model_dir` ``(name, layout)``, holding every file the layout needs, verified by
      :func:`folder_problems`.

    Raises:
      WeightsNotFound: the files are absent and could not be downloaded; the message names the
        folder, the files, the licence page and the token to set.
      BrokenWeights: the files are there but damaged (an invalid index, a shard that does not
        hold what the index says, a file that differs from what save_hf wrote); each named.
    """
    target = model_dir(name, layout)
    problems = folder_problems(target, name, layout)
    if not problems:
        return target
    missing = missing_files(target, name, layout)
    why = ""
    if download and not _offline():
        page, token, client = _source(name, layout)
        try:
            __import__(client)
        except ImportError:
            why = f"\n  ({client} is not installed, so nothing was downloaded.)"
        else:
            print(
                f"Downloading {name} ({layout}) into {target} with {client}. Gemma is "
                f"released under the Gemma Terms of Use: accept them at {page}, and set "
                f"{token}.",
                flush=True,
            )
            try:
                (_download_hf if layout == "hf" else _download_kaggle)(name, target)
            except Exception as exc:  # network, licence not accepted, bad token: say what to do
                raise WeightsNotFound(
                    _instructions(name, layout, target, missing)
                    + f"\n  The download failed: {type(exc).__name__}: {exc}"
                ) from exc
            problems = folder_problems(target, name, layout)
            if not problems:
                return target
            missing = missing_files(target, name, layout)
            why = "\n  (The download finished but files are still missing.)"
    elif download:
        why = "\n  (Offline: HF_HUB_OFFLINE or GEMMA2_LITE_OFFLINE is set, nothing downloaded.)"
    if not missing:
        raise _broken(name, layout, target, problems)
    raise WeightsNotFound(_instructions(name, layout, target, missing) + why)


@dataclass(frozen=True)
class Weights:
    """A located checkpoint: which model, which layout, where, and whether it is the real one.

    Attributes:
      name: the released model's name, e.g. ``"gemma-2-2b-it"``.
      layout: ``"hf"`` or ``"flax"``.
      path: the folder (see :func:`model_dir`).
      is_real: ``False`` for the release-layout fixture (tiny random weights).
    """

    name: str
    layout: str
    path: Path
    is_real: bool

    @property
    def checkpoint(self) -> Path:
        """What the loader reads: the folder itself (hf) or its Orbax directory (flax)."""
        return self.path if self.layout == "hf" else self.path / flax_checkpoint_name(self.name)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"

    def load(self, dtype: Any = None, **kwargs: Any):
        """The :class:`~gemma2_lite.model.Gemma2` (``load_hf`` / ``load_flax``; bf16 by default).

        ``kwargs`` go to the loader (e.g. ``param_dtype``, ``place``).
        """
        import jax.numpy as jnp

        dtype = jnp.bfloat16 if dtype is None else dtype
        if self.layout == "hf":
            return load_hf(self.checkpoint, dtype, **kwargs)
        if not self.is_real and "config" not in kwargs:  # the fixture matches no preset
            kwargs["config"] = fixtures.fixture_config(flax=True)
        return load_flax(self.checkpoint, dtype=dtype, **kwargs)

    def tokenizer(self):
        """Its :class:`~gemma2_lite.tokenizer.Tokenizer` (``tokenizer.model`` in the folder)."""
        from .tokenizer import Tokenizer

        return Tokenizer(self.tokenizer_path)

    def describe(self) -> str:
        """One line saying what this is, for the chapters to print."""
        if self.is_real:
            return f"{self.name} ({self.layout}): the real released weights, from {self.path}"
        return (
            f"{self.name} ({self.layout}): FIXTURE, tiny random weights in the released "
            f"layout, not Gemma (its text is noise), from {self.path}. For the real "
            f"model put its files in {model_dir(self.name, self.layout)} "
            f"(see gemma2_lite.weights)."
        )

    def __str__(self) -> str:
        return self.describe()


def _is_fixture(path: Path) -> bool:
    return (path / FIXTURE_MARKER).exists()


def locate(
    name: str,
    layout: str = "hf",
    *,
    fixture_dir: str | os.PathLike | None = None,
    profile: str | None = None,
    verbose: bool = True,
) -> Weights:
    """The weights a chapter should run on, and whether they are real.

    The folder :func:`model_dir` is verified first (:func:`folder_problems`) whenever it holds
    anything: complete and intact, it is used; incomplete or damaged, it is never quietly
    replaced by the fixture: at ``ci`` (or offline) :class:`BrokenWeights` names each problem,
    at ``colab``/``full`` :func:`pretrained` tries to complete it. When the folder is absent
    or empty: at the ``ci`` profile, the release-layout fixture (written by
    :func:`gemma2_lite.fixtures.ensure` into ``fixture_dir``, default a folder under the
    system's temporary directory); at ``colab``/``full``, :func:`pretrained` (downloads, or
    raises :class:`WeightsNotFound`), except when offline (``GEMMA2_LITE_OFFLINE`` or
    ``HF_HUB_OFFLINE`` set: ``make colab-check`` runs the colab profile on a CPU that way),
    where the fixture stands in, announced as such. Nothing touches the network at ``ci``.
    Prints :meth:`Weights.describe` when ``verbose``.
    """
    check_model(name, layout)
    profile = profile or get_profile()
    path = model_dir(name, layout)
    stand_in = profile == "ci" or _offline()
    present = path.is_dir() and any(path.iterdir())
    if present:
        problems = folder_problems(path, name, layout)
        if not problems:
            found = Weights(name, layout, path, is_real=not _is_fixture(path))
        elif stand_in:  # never a quiet fixture in place of a broken real folder
            raise _broken(name, layout, path, problems)
        else:
            found = Weights(name, layout, pretrained(name, layout), is_real=True)
    elif stand_in:
        if name not in fixtures.FIXTURE_NAMES:
            raise WeightsNotFound(
                _instructions(name, layout, path, missing_files(path, name, layout))
                + f"\n  (At the ci profile only {fixtures.FIXTURE_NAMES} have fixtures.)"
            )
        root = fixtures.ensure(fixture_dir)
        found = Weights(name, layout, model_dir(name, layout, root), is_real=False)
    else:
        found = Weights(name, layout, pretrained(name, layout), is_real=True)
    if verbose:
        print(found.describe(), flush=True)
    return found


def book_model(dtype: Any = None, *, verbose: bool = True) -> tuple[Any, Any]:
    """The book's own small model and its tokenizer: ``(model, tokenizer)``.

    Both ship with the package (:func:`gemma2_lite.paths.book_model_dir`, a Hugging Face-layout
    ``tiny`` Gemma 2 trained on the Shakespeare corpus, and
    :func:`gemma2_lite.paths.tokenizer_file`), so this works installed anywhere, offline. It is
    :func:`locate`'s counterpart for the model the chapters train and study; ``dtype`` is
    passed to :func:`~gemma2_lite.checkpoint.load_hf` (default float32). Prints what it
    loaded when ``verbose``. A missing file raises
    :class:`~gemma2_lite.paths.MissingDataError` naming it and how to restore it.
    """
    from .checkpoint import load_hf
    from .model import param_counts
    from .paths import book_model_dir, require, shown, tokenizer_file
    from .tokenizer import Tokenizer

    folder = require(book_model_dir(), "config.json")
    model = load_hf(folder) if dtype is None else load_hf(folder, dtype)
    tokenizer = Tokenizer(require(tokenizer_file()))
    if verbose:
        c = model.config
        print(
            f"the book's model: the trained tiny Gemma 2, "
            f"{sum(param_counts(c).values()):,} parameters (V={c.vocab_size} D={c.d_model} "
            f"L={c.num_layers} W={c.sliding_window} C={c.max_seq_len}, {c.param_dtype}), "
            f"and its tokenizer ({tokenizer.vocab_size} pieces), shipped with the package "
            f"({shown(folder.parent)})",
            flush=True,
        )
    return model, tokenizer
