"""Dependencies and the repository address, each said in one place and kept in step.

- pyproject.toml declares ranges (tested lower bounds, no upper bound on JAX), so installing the
  package on a runtime that already has a suitable accelerator JAX leaves it alone;
- constraints.txt is the lock `make test` / `make book` install with: every locked version
  satisfies pyproject's range, and every package pyproject names is locked;
- environment.yml pins exactly the locked versions of the packages pyproject names;
- the notebooks' imports are all installed by the setup cell (the package and its
  ``notebooks`` extra), so no chapter fails on Colab for a missing module;
- the repository address (gemma2_lite.profile.REPOSITORY) is the one in _config.yml, the README
  and every notebook's setup cell;
- pyproject's package-data lists exactly the files in gemma2_lite/assets/ (tests/test_install.py
  builds the wheel and runs it).
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gemma2_lite.profile import REPOSITORY

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# The extras `make test` installs (and constraints.txt / environment.yml lock); "weights" (the
# clients that download the released checkpoints) is left to users who want them.
INSTALLED_EXTRAS = ("notebooks", "book", "test")


def _requirements(extras: tuple[str, ...] | None = INSTALLED_EXTRAS) -> list[Requirement]:
    """pyproject's requirements: the core ones plus the given extras (None = every extra)."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for name, extra in PROJECT["optional-dependencies"].items():
        if extras is None or name in extras:
            reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "gemma2-lite"]


def _lock() -> dict[str, str]:
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, wanted = line.partition("==")
            assert wanted, f"constraints.txt: {line!r} is not NAME==VERSION"
            lock[canonicalize_name(name)] = wanted
    return lock


def test_pyproject_declares_ranges_with_lower_bounds_and_never_caps_jax() -> None:
    for req in _requirements(extras=None):
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "==" not in ops, f"{req}: want a tested lower bound, not a pin"
        if canonicalize_name(req.name) in ("jax", "jaxlib"):
            assert ops == {">="}, f"{req}: an upper bound would replace a newer accelerator JAX"


def test_every_locked_version_satisfies_pyproject() -> None:
    lock = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is in pyproject.toml but not locked in constraints.txt"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt locks {req.name}=={lock[name]}, outside pyproject's {req}"
        )


def test_lower_bounds_are_the_tested_lowest_versions() -> None:
    """pyproject's lower bounds are exactly constraints-lowest.txt, the set the tests passed
    with."""
    lowest = {}
    for line in (ROOT / "constraints-lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, v = line.partition("==")
            lowest[canonicalize_name(name)] = v
    for req in (Requirement(r) for r in PROJECT["dependencies"]):
        floor = next(s.version for s in req.specifier if s.operator == ">=")
        tested = lowest.get(canonicalize_name(req.name))
        assert tested is not None and Version(tested) == Version(floor), (
            f"{req}: its lower bound is not the version constraints-lowest.txt was tested with"
        )


def test_environment_yml_follows_the_lock() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pip if "==" in p}
    lock = _lock()
    wanted = {canonicalize_name(r.name) for r in _requirements()}
    assert set(pins) == wanted, f"environment.yml vs pyproject: {set(pins) ^ wanted}"
    for name, pinned in pins.items():
        assert pinned == lock[name], f"environment.yml pins {name}=={pinned}, the lock {lock[name]}"


def test_installed_versions_are_the_locked_ones() -> None:
    """What make test installed is the lock (a local label such as +cpu aside)."""
    lock = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert version(req.name).split("+")[0] == lock[name], (req.name, version(req.name))


def _imported_modules(path: Path) -> set[str]:
    """Top-level modules imported by a notebook's code cells (IPython magics skipped)."""
    mods = set()
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "\n".join(
            l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!"))
        )
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_installs_everything_the_chapter_imports(path: Path) -> None:
    installed = {canonicalize_name(r.name) for r in _requirements(("notebooks",))}
    # what each of those brings with it (e.g. jax brings scipy and opt_einsum)
    from importlib.metadata import requires

    todo = list(installed)
    while todo:
        for r in requires(todo.pop()) or []:
            req = Requirement(r)
            if req.marker is None and canonicalize_name(req.name) not in installed:
                installed.add(canonicalize_name(req.name))
                todo.append(canonicalize_name(req.name))
    dists = packages_distributions()
    optional = {"torch", "transformers", "google"}  # used only when present (checked in the cell)
    kernel = {"IPython", "ipykernel"}  # every Jupyter kernel has them
    for mod in sorted(_imported_modules(path) - optional - kernel):
        if mod in sys.stdlib_module_names or mod == "gemma2_lite":
            continue
        owners = {canonicalize_name(d) for d in dists.get(mod, [])}
        assert owners & installed, (
            f"{path.name} imports {mod!r} (from {sorted(owners)}), which neither the package nor "
            "its 'notebooks' extra installs: add it to pyproject.toml"
        )


def test_repository_address_is_the_same_everywhere() -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == REPOSITORY
    assert REPOSITORY in (ROOT / "README.md").read_text()
    assert REPOSITORY in (ROOT / "notebooks" / "SETUP_CELL.md").read_text()
    for path in NOTEBOOKS:
        setup = "".join(
            next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")[
                "source"
            ]
        )
        urls = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", setup))
        assert urls == {REPOSITORY}, f"{path.name}'s setup cell names {urls}, not {REPOSITORY}"


def test_package_data_lists_every_shipped_file() -> None:
    """pyproject's package-data names exactly the files in gemma2_lite/assets/ (a file added
    there but not listed would be missing from the wheel, and only an installed user would
    notice), and every name gemma2_lite.paths ships is among them."""
    from gemma2_lite import paths

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
            "gemma2_lite"
        ]
    )
    present = {
        str(p.relative_to(ROOT / "gemma2_lite"))
        for p in paths.ASSETS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert listed == present, (sorted(listed - present), sorted(present - listed))
    for name in paths.SHIPPED:
        assert any(
            entry == f"assets/{name}" or entry.startswith(f"assets/{name}/") for entry in listed
        ), name
    # one copy in git: none of them is also under data/
    for name in paths.SHIPPED:
        assert not (ROOT / "data" / name).exists(), name
