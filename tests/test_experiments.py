"""Each experiment runs end to end at the micro 'smoke' size and writes its JSON and figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma2_lite.book.experiments import (
    REPORT,
    corpus_tokens,
    main,
    run_deep_vs_wide,
    run_distillation,
    run_gqa_vs_mha,
    run_train_tiny,
    run_window,
)
from gemma2_lite.book.seed_records import RecordError, read_record, record_digest, write_record
from gemma2_lite.checkpoint import load_hf
from gemma2_lite.model import param_counts
from gemma2_lite.profile import data_path
from gemma2_lite.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _outputs(base: Path, name: str) -> dict:
    out = base / name
    saved = json.loads((out / "results.json").read_text())
    # the payload names its figure (the notebooks display it from there)
    assert Path(saved["figure"]) == out / f"{name}.png"
    assert (out / f"{name}.png").stat().st_size > 1000
    return saved


def test_corpus_tokens_roundtrip() -> None:
    ids = corpus_tokens("valid", max_chars=300)
    tok = Tokenizer(data_path("tokenizer.model"))
    assert ids.dtype == np.int32 and ids[0] == tok.bos_id
    first_eos = int(np.argmax(ids == tok.eos_id))
    from gemma2_lite.data import load_documents

    assert tok.decode(ids[1:first_eos]) == load_documents("valid")[0]["text"][:300]


@pytest.mark.slow  # four models compiled: ~40 s of CPU on 2 cores
def test_distillation_smoke(tmp_path: Path) -> None:
    res = run_distillation("smoke", results_dir=tmp_path, quiet=True)
    saved = _outputs(tmp_path, "distillation")
    assert set(saved["final_val_perplexity"]) == {
        "teacher",
        "one-hot",
        "teacher (full)",
        "teacher (top-8)",
        "teacher (top-8) + labels",
    }
    assert all(np.isfinite(v) and v > 1 for v in saved["final_val_perplexity"].values())
    assert saved["report"]["distillation_2b_avg_benchmark"] == {
        "from_scratch": 60.3,
        "distilled": 67.7,
    }
    assert res["student_params"]["total"] < res["teacher_params"]["total"]
    rows = (tmp_path / "distillation" / "curves.csv").read_text().splitlines()
    assert rows[0] == "run,step,tokens,val_loss,val_perplexity" and len(rows) > 8


def test_window_smoke(tmp_path: Path) -> None:
    run_window("smoke", results_dir=tmp_path, quiet=True)
    saved = _outputs(tmp_path, "window")
    assert [r["window"] for r in saved["results"]] == [8, 4, 2]
    assert saved["relative_change"][0] == 0.0
    # different windows really change the model's predictions
    assert len({r["val_loss"] for r in saved["results"]}) == 3


@pytest.mark.slow  # four models compiled: ~40 s of CPU on 2 cores
def test_ablations_smoke_have_equal_budgets(tmp_path: Path) -> None:
    gqa = run_gqa_vs_mha("smoke", results_dir=tmp_path, quiet=True)
    p = gqa["params"]
    assert abs(p["GQA"]["non_embedding"] / p["MHA"]["non_embedding"] - 1) < 0.01
    assert gqa["configs"]["GQA"]["num_kv_heads"] < gqa["configs"]["MHA"]["num_kv_heads"]
    deep = run_deep_vs_wide("smoke", results_dir=tmp_path, quiet=True)
    p = deep["params"]
    assert abs(p["deep"]["non_embedding"] / p["wide"]["non_embedding"] - 1) < 0.01
    assert deep["configs"]["deep"]["num_layers"] > deep["configs"]["wide"]["num_layers"]
    for name in ("gqa-vs-mha", "deep-vs-wide"):
        saved = _outputs(tmp_path, name)
        assert isinstance(saved["same_trend_as_report"], bool)
    assert REPORT["gqa_vs_mha_avg"] == {"MHA": 50.3, "GQA": 50.8}


def test_train_tiny_smoke_saves_loadable_model(tmp_path: Path) -> None:
    res = run_train_tiny("smoke", results_dir=tmp_path, quiet=True, out=tmp_path / "model")
    _outputs(tmp_path, "train-tiny")
    model = load_hf(tmp_path / "model")
    assert param_counts(model.config) == {
        k: res["params"][k] for k in ("embedding", "non_embedding")
    }
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "--profile smoke" in readme and f"{res['final_val_loss']:.4f}" in readme
    assert res["sample"].startswith("ROMEO:") and res["sample"] in readme


def test_cli_rejects_unknown_and_misplaced_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["no-such-experiment"])
    with pytest.raises(SystemExit):
        main(["window", "--profile", "huge"])
    with pytest.raises(SystemExit):
        main(["window", "--steps", "3"])
    help_text = subprocess.run(
        [sys.executable, "-m", "gemma2_lite.book.experiments", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    assert "distillation" in help_text and "smoke" not in help_text


def test_seed_record_mean_spread_and_staleness(tmp_path, monkeypatch) -> None:
    """run_seeds records every seed; seed_report sets a run beside the record, and refuses a
    record that its own seed's run no longer reproduces."""
    import json

    from gemma2_lite.book import experiments as ex

    _records_in(tmp_path, monkeypatch)
    record = ex.run_seeds("gqa-vs-mha", (0, 1), "smoke")
    path = tmp_path / "ablations" / "gqa-vs-mha-smoke.json"
    assert json.loads(path.read_text())["seeds"] == [0, 1]
    for label, s in record["summary"].items():
        values = [record["per_seed"][k][label] for k in ("0", "1")]
        assert s["min"] == min(values) and s["max"] == max(values)
        assert s["mean"] == pytest.approx(sum(values) / 2)
    # A run of seed 0 (as the record made it; the book's build makes it afresh).
    run = {
        "experiment": "gqa-vs-mha",
        "profile": "smoke",
        "seed": 0,
        "final_val_perplexity": dict(record["per_seed"]["0"]),
    }
    text = ex.seed_report(run)
    assert "2 seeds" in text and "gap between the means" in text
    stale = json.loads(path.read_text())
    stale["per_seed"]["0"] = {k: 2 * v for k, v in stale["per_seed"]["0"].items()}
    write_record(path, stale)  # a record made by other code: sealed, stale
    with pytest.raises(AssertionError, match="differ from the record"):
        ex.seed_report(run)


def _records_in(folder, monkeypatch) -> None:
    """Seed records are written (experiments) and read (seed_records) in ``folder``."""
    from gemma2_lite.book import experiments, seed_records

    real = seed_records.data_path
    fake = lambda *parts: (
        folder.joinpath(*parts) if parts[:1] == (seed_records.SEED_RECORDS,) else real(*parts)
    )
    for module in (experiments, seed_records):
        monkeypatch.setattr(module, "data_path", fake)


def test_a_recorded_run_is_replayed_only_after_its_first_steps_match(tmp_path, monkeypatch) -> None:
    """With a seed record, seed 0 is replayed from it (the chapters' ci build) once its first
    steps, re-run, give the recorded losses; a record those steps no longer reproduce raises."""
    import json

    from gemma2_lite.book import experiments as ex

    _records_in(tmp_path, monkeypatch)
    results = tmp_path / "results"
    record = ex.run_seeds("window", (0, 1), "smoke")
    replayed = ex.run_window("smoke", results_dir=results, quiet=True)
    assert replayed["replayed"]["checked_steps"] == replayed["check"]["steps"] > 0
    assert ex.final_numbers(replayed) == record["per_seed"]["0"]
    assert (results / "window" / "window.png").exists()
    assert "re-run here" in ex.replay_line(replayed)
    assert "replayed" not in ex.run_window("smoke", results_dir=results, quiet=True, live=True)
    assert "replayed" not in ex.run_window("smoke", results_dir=results, quiet=True, seed=1)
    path = tmp_path / "ablations" / "window-smoke.json"
    stale = json.loads(path.read_text())
    stale["replay"]["payload"]["check"]["train_loss"][-1] *= 1.01
    write_record(path, stale)
    with pytest.raises(AssertionError, match="stale"):
        ex.run_window("smoke", results_dir=results, quiet=True)
    # An edited result with the fingerprint kept, not resealed: refused before it is shown.
    edited = json.loads(path.read_text())
    edited["replay"]["payload"]["check"]["train_loss"][-1] /= 1.01  # fingerprint back
    edited["replay"]["payload"]["results"][0]["val_perplexity"] *= 0.5  # a better number
    path.write_text(json.dumps(edited, indent=1))
    with pytest.raises(
        RecordError,
        match=r"window-smoke.json was changed after it was "
        r"recorded: .*remake it with `python -m",
    ):
        ex.run_window("smoke", results_dir=results, quiet=True)
    with pytest.raises(RecordError, match="was changed after it was recorded"):
        ex.seed_report(replayed)


def test_the_books_seed_records_are_sealed() -> None:
    """Every committed record carries the sha256 of its whole content, and a change to any
    number breaks it."""
    paths = sorted((ROOT / "data" / "ablations").glob("*.json"))
    assert paths
    for path in paths:
        record = read_record(path)
        assert path.read_text() == json.dumps(record, indent=1) + "\n"  # as write_record writes
        record["summary"][next(iter(record["summary"]))]["mean"] += 1e-9
        assert record_digest(record) != record["sha256"]


def test_train_tiny_steps_zero_trains_nothing(tmp_path: Path) -> None:
    """--steps 0 (and steps=0) means zero steps, not the profile's default."""
    assert (
        main(
            [
                "train-tiny",
                "--profile",
                "smoke",
                "--steps",
                "0",
                "--quiet",
                "--results-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    saved = _outputs(tmp_path, "train-tiny")
    assert saved["train_config"]["steps"] == 0 and saved["tokens_trained"] == 0
    assert saved["command"].endswith("--steps 0")
