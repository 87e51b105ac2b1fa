"""environment.yml (conda users) and pyproject.toml (pip users) pin the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins.update(extra)
    return pins


def environment_pins() -> tuple[set[str], list]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    return {p for p in pip if not p.startswith("-")}, deps


def test_every_dependency_is_pinned_exactly():
    for pin in pyproject_pins():
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+]*", pin), pin


def test_environment_yml_matches_pyproject():
    env_pins, deps = environment_pins()
    assert env_pins == pyproject_pins(), (
        f"only in environment.yml: {sorted(env_pins - pyproject_pins())}; "
        f"only in pyproject.toml: {sorted(pyproject_pins() - env_pins)}")
    assert "python=3.11" in deps


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    for pin in pyproject_pins():
        name, wanted = pin.split("==")
        assert version(name).split("+")[0] == wanted, (name, version(name), wanted)
