"""Finding the released weights: one folder, one variable, downloads only when allowed (all
offline here: every download is replaced by a stub), and the fixtures at the ci profile."""

from __future__ import annotations

import re
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_lite import weights
from gemma2_lite.checkpoint import to_arrays
from gemma2_lite.fixtures import FIXTURE_VERSION, TOKENIZER_VOCAB, ensure
from gemma2_lite.weights import (
    ENV_VAR,
    FIXTURE_MARKER,
    WeightsNotFound,
    locate,
    missing_files,
    model_dir,
    pretrained,
)


def _no_network(name, target):
    raise AssertionError("a test tried to download")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: an empty weights folder, no offline flags, downloads that fail loudly."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "weights"))
    for var in ("HF_HUB_OFFLINE", "GEMMA2_LITE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(weights, "_download_hf", _no_network)
    monkeypatch.setattr(weights, "_download_kaggle", _no_network)
    return tmp_path / "weights"


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory):
    return ensure(tmp_path_factory.mktemp("fx") / "fixtures")


def install(fixtures_dir, root, name="gemma-2-2b", layout="hf", *, as_real=True):
    """Copy a fixture folder into the weights folder (without its marker: 'real' files)."""
    target = model_dir(name, layout, root)
    shutil.copytree(model_dir(name, layout, fixtures_dir), target)
    if as_real:
        (target / FIXTURE_MARKER).unlink()
    return target


def test_the_folder_comes_from_one_variable(offline, monkeypatch, tmp_path):
    assert model_dir("gemma-2-2b-it", "flax") == offline / "gemma-2-2b-it" / "flax"
    monkeypatch.delenv(ENV_VAR)
    assert weights.weights_root() == weights.Path.home() / ".cache" / "gemma2-lite" / "weights"
    with pytest.raises(ValueError, match="unknown model 'gemma-3-4b'"):
        model_dir("gemma-3-4b")
    with pytest.raises(ValueError, match="layout must be one of"):
        pretrained("gemma-2-2b", layout="pytorch")


def test_complete_folders_are_returned_without_downloading(offline, fixtures_dir):
    for layout in ("hf", "flax"):
        target = install(fixtures_dir, offline, layout=layout)
        assert missing_files(target, "gemma-2-2b", layout) == []
        assert pretrained("gemma-2-2b", layout) == target


def test_missing_files_are_named_with_what_to_do(offline, fixtures_dir):
    target = install(fixtures_dir, offline)
    (target / "model-00002-of-00003.safetensors").unlink()
    (target / "tokenizer.model").unlink()
    assert missing_files(target, "gemma-2-2b") == [
        "tokenizer.model",
        "model-00002-of-00003.safetensors",
    ]
    with pytest.raises(WeightsNotFound) as info:
        pretrained("gemma-2-2b", download=False)
    msg = str(info.value)
    for needle in (
        str(target),
        "model-00002-of-00003.safetensors",
        "tokenizer.model",
        ENV_VAR,
        "https://huggingface.co/google/gemma-2-2b",
        "Gemma Terms of Use",
        "HF_TOKEN",
        "gemma2-lite[weights]",
    ):
        assert needle in msg, needle
    with pytest.raises(WeightsNotFound) as info:
        pretrained("gemma-2-9b-it", layout="flax", download=False)
    msg = str(info.value)
    for needle in (
        "gemma2-9b-it/",
        "kaggle.com/models/google/gemma-2",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "kagglehub",
    ):
        assert needle in msg, needle


def test_download_goes_through_the_client_after_naming_the_licence(
    offline, fixtures_dir, monkeypatch, capsys
):
    calls = []

    def fake_hf(name, target):
        calls.append((name, target))
        shutil.copytree(model_dir("gemma-2-2b-it", "hf", fixtures_dir), target)

    monkeypatch.setattr(weights, "_download_hf", fake_hf)
    path = pretrained("gemma-2-2b-it")
    assert calls == [("gemma-2-2b-it", offline / "gemma-2-2b-it" / "hf")] and path == calls[0][1]
    out = capsys.readouterr().out
    assert "Gemma Terms of Use" in out and "https://huggingface.co/google/gemma-2-2b-it" in out
    assert "HF_TOKEN" in out
    pretrained("gemma-2-2b-it")  # now present: no second download
    assert len(calls) == 1


def test_failed_or_impossible_downloads_explain(offline, monkeypatch):
    def refused(name, target):
        raise OSError("403 Client Error: you must accept the licence")

    monkeypatch.setattr(weights, "_download_hf", refused)
    with pytest.raises(
        WeightsNotFound,
        match=r"(?s)Put config.json.*download failed: "
        r"OSError: 403",
    ):
        pretrained("gemma-2-2b")
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # not installed
    with pytest.raises(WeightsNotFound, match="kagglehub is not installed"):
        pretrained("gemma-2-2b", layout="flax")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "_download_hf", _no_network)
    with pytest.raises(WeightsNotFound, match="Offline"):
        pretrained("gemma-2-2b")


def test_locate_falls_back_to_the_fixture_at_ci_and_says_so(offline, fixtures_dir, capsys):
    found = {}
    for layout in ("hf", "flax"):
        w = locate("gemma-2-2b-it", layout, fixture_dir=fixtures_dir, profile="ci")
        assert not w.is_real and w.path == model_dir("gemma-2-2b-it", layout, fixtures_dir)
        assert "FIXTURE" in capsys.readouterr().out
        found[layout] = to_arrays(w.load(jnp.float32))
        assert w.tokenizer().end_of_turn_id == 107
    assert found["hf"][("embedder", "embedding")].shape[0] == TOKENIZER_VOCAB
    assert found["flax"][("embedder", "embedding")].shape[0] == TOKENIZER_VOCAB + 128
    np.testing.assert_array_equal(
        found["hf"][("layers", 2, "mlp", "gate")], found["flax"][("layers", 2, "mlp", "gate")]
    )
    assert not any(offline.rglob("*"))  # nothing written into the weights folder


def test_locate_prefers_real_files_and_never_calls_a_fixture_real(offline, fixtures_dir, capsys):
    install(fixtures_dir, offline)
    w = locate("gemma-2-2b", profile="ci")
    assert w.is_real and w.path == model_dir("gemma-2-2b", "hf")
    assert "the real released weights" in capsys.readouterr().out
    install(fixtures_dir, offline, "gemma-2-2b-it", as_real=False)  # a fixture put there
    assert not locate("gemma-2-2b-it", profile="full").is_real


def test_locate_beyond_ci_needs_the_real_files(offline, fixtures_dir):
    with pytest.raises(WeightsNotFound, match="gemma-2-2b"):
        locate("gemma-2-2b", profile="colab")  # stubbed download: no fixture instead
    with pytest.raises(WeightsNotFound, match="only .* have fixtures"):
        locate("gemma-2-9b", profile="ci", fixture_dir=fixtures_dir)


def test_fixtures_are_written_once(fixtures_dir):
    stamp = fixtures_dir / ".complete"
    before = stamp.stat().st_mtime_ns
    assert ensure(fixtures_dir) == fixtures_dir and stamp.stat().st_mtime_ns == before
    assert stamp.read_text().strip() == str(FIXTURE_VERSION)


def test_locate_offline_beyond_ci_runs_on_the_fixture_and_says_so(
    offline, fixtures_dir, monkeypatch, capsys
):
    """make colab-check: the colab profile on a CPU, offline, without the real files."""
    monkeypatch.setenv("GEMMA2_LITE_OFFLINE", "1")
    w = locate("gemma-2-2b", profile="colab", fixture_dir=fixtures_dir)
    assert not w.is_real and "FIXTURE" in capsys.readouterr().out
    install(fixtures_dir, offline)  # real files present: they win, offline too
    assert locate("gemma-2-2b", profile="colab").is_real


def _flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


BROKEN = {
    "missing shard": (
        lambda t: (t / "model-00002-of-00003.safetensors").unlink(),
        r"missing:? model-00002-of-00003\.safetensors",
    ),
    "invalid index": (
        lambda t: (t / "model.safetensors.index.json").write_text("{}"),
        r"missing:? a valid model\.safetensors\.index\.json .*non-empty "
        r"'weight_map'",
    ),
    "index names a shard wrongly": (
        lambda t: (t / "model.safetensors.index.json").write_text(
            (t / "model.safetensors.index.json")
            .read_text()
            .replace('"model.norm.weight": "model-00001', '"model.norm.weight": "model-00002')
        ),
        r"puts 'model.norm.weight' in model-00002-of-00003.safetensors, but it is in",
    ),
    "flipped byte": (
        lambda t: _flip_byte(t / "model-00001-of-00003.safetensors"),
        r"model-00001-of-00003\.safetensors has changed since it was written "
        r"\(sha256 differs\)",
    ),
    "truncated shard": (
        lambda t: (t / "model-00003-of-00003.safetensors").write_bytes(
            (t / "model-00003-of-00003.safetensors").read_bytes()[:-10]
        ),
        r"model-00003-of-00003\.safetensors: tensor .* truncated",
    ),
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_a_broken_real_folder_is_named_never_replaced_by_the_fixture(
    offline, fixtures_dir, damage, monkeypatch
):
    target = install(fixtures_dir, offline)
    assert weights.folder_problems(target, "gemma-2-2b") == []
    edit, expected = BROKEN[damage]
    edit(target)
    assert re.search(expected, "\n".join(weights.folder_problems(target, "gemma-2-2b")))
    with pytest.raises(
        weights.BrokenWeights,
        match=rf"(?s)gemma-2-2b \(hf layout\) in "
        rf"{re.escape(str(target))} is "
        rf"incomplete or damaged.*{expected}",
    ):
        locate("gemma-2-2b", profile="ci", fixture_dir=fixtures_dir)
    monkeypatch.setenv("GEMMA2_LITE_OFFLINE", "1")
    with pytest.raises(WeightsNotFound, match=expected):  # named there too
        pretrained("gemma-2-2b")


def test_a_broken_flax_folder_is_named_too(offline, fixtures_dir):
    target = install(fixtures_dir, offline, layout="flax")
    shutil.rmtree(target / "gemma2-2b")
    with pytest.raises(weights.BrokenWeights, match=r"missing gemma2-2b/ \(the Orbax checkpoint"):
        locate("gemma-2-2b", "flax", profile="ci", fixture_dir=fixtures_dir)
