"""Installed anywhere: the wheel carries the book's tokenizer, model and corpus, and the CLI runs
from a folder that has nothing to do with the checkout.

The package's sources are copied out of the checkout (so the build writes nothing here), built
into a wheel with this .venv's setuptools (``--no-build-isolation``: offline), installed with
``--no-deps`` into a fresh virtual environment that sees this .venv's JAX and the rest through a
``.pth`` file (tests/venvs.py), and run from an empty folder with a clean environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from venvs import clean_env, fresh_venv

from gemma2_lite import paths

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SOURCES = (
    "pyproject.toml",
    "README.md",
    "MANIFEST.in",
    "gemma2_lite",
    "data/README.md",
    "data/build_corpus.py",
)


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for name in SOURCES:
        source, target = ROOT / name, src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("gemma2_lite-*.whl")
    return wheel


def test_wheel_installs_and_the_cli_runs_from_an_empty_folder(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if "/assets/" in n}
    for name in paths.SHIPPED:
        assert any(n.startswith(f"gemma2_lite/assets/{name}") for n in shipped), (name, shipped)
    assert "gemma2_lite/assets/tiny-model/model.safetensors" in shipped
    assert "gemma2_lite/assets/README.md" in shipped  # the corpus's licence notes

    python = fresh_venv(tmp_path, pip=False)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        env=clean_env(),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(GEMMA2_LITE_PROFILE="ci")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = run("-c", "import gemma2_lite.paths as p; print(p.ASSETS); print(p.checkout())")
    assets, checkout = where.stdout.split()
    assert Path(assets).is_relative_to(tmp_path / "venv") and checkout == "None", where

    out = run("-m", "gemma2_lite", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:\n"), out.stdout
    assert "tokens in" in out.stderr and "Traceback" not in out.stderr
    assert list(elsewhere.iterdir()) == []  # it wrote nothing here
    # the shipped SFT adapters (chapters 08b, 08c) load from the install, no checkout
    out = run(
        "-c",
        "from gemma2_lite import lora; from gemma2_lite.book import recipes; "
        "print(lora.count_lora_params(recipes.sft_adapters(seed=2)))",
    )
    assert out.returncode == 0 and out.stdout.split()[-1] == "90368", out.stderr[-3000:]

    # A shipped file gone from the install: the message names it and how to get it back.
    (Path(assets) / "tokenizer.model").unlink()
    out = run("-m", "gemma2_lite", "generate", "--prompt", "ROMEO:")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "tokenizer.model is not there" in out.stderr
    assert "pip install --force-reinstall gemma2-lite" in out.stderr
    assert "train-tiny" not in out.stderr and "retrain" not in out.stderr
