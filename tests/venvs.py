"""Fresh virtual environments for the tests that install the package as a user would.

The new environment sees this .venv's packages (JAX, Flax, ...) through a ``.pth`` file, as a
Colab runtime sees its preinstalled ones, less gemma2-lite itself, so installing into it needs
no network and takes seconds. Only the listed folder is added to ``sys.path``: the ``.pth``
files inside it (this checkout's editable install) are not processed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def mirror_site_packages(dest: Path) -> None:
    """This .venv's packages, as links, less this package itself (the test must install it)."""
    dest.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("gemma2_lite", "gemma2-lite", "__editable__")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)


def fresh_venv(where: Path, *, pip: bool) -> Path:
    """A new virtual environment in ``where/venv`` that also sees this .venv's packages;
    returns its python. ``pip=False`` skips installing pip into it (faster: install with this
    .venv's pip and ``--python``)."""
    venv = where / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", *([] if pip else ["--without-pip"]), str(venv)], check=True
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    mirror = where / "preinstalled"
    mirror_site_packages(mirror)
    (Path(purelib.stdout.strip()) / "preinstalled.pth").write_text(f"{mirror}\n")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Python, venv, pip or gemma2-lite settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GEMMA2_LITE_", "PIP_"))
    }
    env.update(extra)
    return env
