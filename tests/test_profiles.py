"""Every profile's sizes satisfy what each chapter's checks assume, without running the chapters.

Each notebook keeps all its profile-dependent sizes in one code cell tagged ``sizes`` (right after
the setup cell), with asserts stating what the chapter's later checks need of them (e.g. chapter
02's order-blindness check needs every token inside the local window). CI executes the notebooks
at ``ci`` only; this test executes every ``sizes`` cell at ``ci``, ``colab`` and ``full``, with
and without the loop cap, in seconds, so a size that breaks a chapter at another profile fails
here. It also pins how ``pick``, the loop cap and the hardware-following default behave.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma2_lite import profile
from gemma2_lite.profile import PROFILES, pick

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _sizes_source(path: Path) -> str:
    cells = [c for c in _code_cells(path) if "sizes" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'sizes', want exactly 1"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_all_sizes_live_in_the_sizes_cell(path: Path) -> None:
    code = _code_cells(path)
    assert "sizes" in code[1]["metadata"].get("tags", []), f"{path.name}: sizes cell not 2nd"
    others = [i for i, c in enumerate(code) if i != 1 and "pick(" in "".join(c["source"])]
    assert not others, f"{path.name}: code cells {others} call pick() outside the sizes cell"


@pytest.mark.parametrize("cap", [None, "2"])
@pytest.mark.parametrize("prof", PROFILES)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sizes_cell_holds_at_every_profile(
    path: Path, prof: str, cap: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(profile.ENV_VAR, prof)
    if cap is None:
        monkeypatch.delenv(profile.LOOP_CAP_VAR, raising=False)
    else:
        monkeypatch.setenv(profile.LOOP_CAP_VAR, cap)
    namespace: dict = {"pick": pick}
    exec(compile(_sizes_source(path), f"{path.name}:sizes", "exec"), namespace)


def test_pick_caps_loops_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profile.ENV_VAR, "colab")
    monkeypatch.delenv(profile.LOOP_CAP_VAR, raising=False)
    assert pick(ci=3, colab=3000, full=9, loop=True) == 3000
    monkeypatch.setenv(profile.LOOP_CAP_VAR, "7")
    assert pick(ci=3, colab=3000, full=9, loop=True) == 7  # a loop count: capped
    assert pick(ci=3, colab=3000, full=9) == 3000  # a shape: never
    assert pick(ci=3, colab=5, full=9, loop=True) == 5  # below the cap: unchanged
    assert pick(ci=3, colab=None, full=9, loop=True) is None  # "no limit" stays
    monkeypatch.setenv(profile.LOOP_CAP_VAR, "zero")
    with pytest.raises(ValueError, match="GEMMA2_LITE_LOOP_CAP"):
        pick(ci=3, colab=3000, full=9, loop=True)


@pytest.mark.parametrize("attached, expected", [(None, "ci"), ("tpu", "colab"), ("gpu", "colab")])
def test_unset_profile_follows_the_hardware(attached, expected, monkeypatch) -> None:
    monkeypatch.delenv(profile.ENV_VAR, raising=False)
    monkeypatch.setattr(profile, "attached_accelerator", lambda: attached)
    assert profile.get_profile() == expected
    monkeypatch.setenv(profile.ENV_VAR, "ci")  # an explicit setting wins
    assert profile.get_profile() == "ci"


def test_cpu_only_jax_on_an_accelerator_is_named_with_its_fix(monkeypatch) -> None:
    monkeypatch.setattr(profile, "attached_accelerator", lambda: "gpu")
    line = profile.describe_devices()  # this machine's JAX sees only the CPU
    assert "GPU is attached but JAX sees only the CPU" in line
    assert 'pip install -U "jax[cuda12]"' in line
    monkeypatch.setattr(profile, "attached_accelerator", lambda: None)
    assert "attached" not in profile.describe_devices()


def test_bad_profile_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profile.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="'tpu' is not a profile"):
        profile.get_profile()


def test_one_profile_table_with_smoke_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    """``smoke`` is a profile like the others: the environment, pick and the experiments'
    command line all accept it; a value picked without a smoke size takes its ci one."""
    from gemma2_lite.book import experiments

    assert experiments.PROFILES is PROFILES
    assert list(PROFILES) == ["smoke", "ci", "colab", "full"]
    assert profile.BOOK_PROFILES == ("ci", "colab", "full")
    monkeypatch.setenv(profile.ENV_VAR, "smoke")
    monkeypatch.delenv(profile.LOOP_CAP_VAR, raising=False)
    assert profile.get_profile() == "smoke"
    assert pick(ci=3, colab=30, full=300) == 3  # no smoke size: ci's
    assert pick(ci=3, colab=30, full=300, smoke=1) == 1
    for name in PROFILES:
        assert (
            pick(ci="c", colab="g", full="f", profile=name)
            == {"smoke": "c", "ci": "c", "colab": "g", "full": "f"}[name]
        )
    with pytest.raises(ValueError, match=r"unknown profile 'tiny'; choose one of \('smoke', "):
        pick(ci=1, colab=2, full=3, profile="tiny")
    monkeypatch.setenv(profile.ENV_VAR, "tiny")
    with pytest.raises(ValueError, match=r"'tiny' is not a profile; choose one of \('smoke', "):
        profile.get_profile()
