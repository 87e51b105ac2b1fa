"""The notebooks' setup cell, run as a Colab runtime runs it, without the network.

A fresh virtual environment stands in for the runtime: it already has JAX and the rest (this
.venv's packages, seen through a .pth file, as Colab's preinstalled ones), a stand-in
``google.colab`` module is imported first (Colab's kernel has it), git is pointed at a local
clone of this repository instead of GitHub (``url.<here>.insteadOf``), and pip may not reach any
index (``PIP_NO_INDEX``): anything the cell tried to download, such as a replacement JAX, fails
the test. The cell must clone, install the package with its ``notebooks`` extra, import it and
print the profile line; the JAX that was there must be the one imported afterwards. A second
run, as after a runtime restart, must find the clone and install nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from venvs import clean_env, fresh_venv

from gemma2_lite.profile import REPOSITORY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

DRIVER = """
import importlib, sys
import google.colab                              # the stand-in; Colab's kernel imports the real one
exec(compile(open(sys.argv[1]).read(), "setup-cell", "exec"))
import jax, gemma2_lite
print("JAX_FILE", jax.__file__)
print("JAX_VERSION", jax.__version__)
print("PACKAGE_FILE", gemma2_lite.__file__)
"""


def _setup_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "01_tokenizer.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_setup_cell_installs_the_book_and_keeps_the_installed_jax(tmp_path: Path) -> None:
    content = tmp_path / "content"
    python = fresh_venv(tmp_path, pip=True)
    stand_in = tmp_path / "stand_in" / "google" / "colab"  # google/ stays a namespace package
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('"""A stand-in for Colab\'s google.colab."""\n')
    (stand_in / "output.py").write_text(
        '"""JAX\'s debugger imports it when google.colab exists."""\n'
    )

    cell = _setup_cell()
    assert '"/content/gemma2-lite"' in cell and REPOSITORY in cell
    cell_file = tmp_path / "setup_cell.py"
    cell_file.write_text(cell.replace('"/content/gemma2-lite"', repr(str(content / "gemma2-lite"))))
    (tmp_path / "driver.py").write_text(DRIVER)
    content.mkdir()
    env = clean_env(
        **{
            "PYTHONPATH": str(tmp_path / "stand_in"),
            "PIP_NO_INDEX": "1",  # nothing may be downloaded
            "PIP_NO_BUILD_ISOLATION": "0",  # (pip's spelling of "no build isolation")
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "GIT_CONFIG_COUNT": "1",  # the cell's GitHub address -> this repository
            "GIT_CONFIG_KEY_0": f"url.{ROOT.as_uri()}.insteadOf",
            "GIT_CONFIG_VALUE_0": REPOSITORY,
        }
    )

    def run_cell() -> dict[str, str]:
        out = subprocess.run(
            [python, tmp_path / "driver.py", cell_file],
            cwd=content,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert any(l.startswith("profile=ci ") for l in lines), out.stdout
        return dict(l.split(" ", 1) for l in lines if l.startswith(("JAX_", "PACKAGE_")))

    import jax

    first = run_cell()
    assert (content / "gemma2-lite" / "notebooks").is_dir(), "the cell did not clone the book"
    assert Path(first["PACKAGE_FILE"]).is_relative_to(content / "gemma2-lite")
    # The JAX that was installed is the one in use: not reinstalled, upgraded or shadowed.
    assert Path(first["JAX_FILE"]).parent.resolve() == Path(jax.__file__).parent.resolve()
    assert first["JAX_VERSION"] == jax.__version__
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower(): p for p in json.loads(installed.stdout)}
    assert "gemma2-lite" in names and names["jax"]["version"] == jax.__version__

    second = run_cell()  # a runtime restart: the clone is there
    assert second == first
