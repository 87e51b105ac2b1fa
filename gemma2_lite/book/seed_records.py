"""Seed records of the book's ablations: ``data/ablations/<name>-<profile>.json``.

A record holds every seed's final numbers, their mean and spread, the command that made it,
and (under ``replay``) seed 0's whole result with a fingerprint: the losses of its first
training steps and of a short evaluation after them. The chapters show the ablations at the
``ci`` profile from the record instead of training again, after re-running the fingerprint
(:func:`replay_payload`).

Each record is sealed by the sha256 of its whole content (:func:`seal`, field ``sha256``):
a record whose numbers were edited afterwards — even with its fingerprint kept — is refused
with :class:`RecordError` naming the file, before any of it is shown. The digest is taken over
the record as canonical JSON (keys sorted, no spaces, ASCII), so it does not depend on how the
file is indented.

This module reads and checks records, and sets a chapter's run beside the book's record of
it (:func:`seed_report`); :mod:`gemma2_lite.book.experiments` runs the seeds and the
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemma2_lite.paths import data_path
from gemma2_lite.profile import loop_cap

__all__ = [
    "HASH_FIELD",
    "CHECK_REL",
    "RecordError",
    "record_digest",
    "seal",
    "write_record",
    "read_record",
    "final_numbers",
    "spread",
    "compare",
    "report_lines",
    "replay_payload",
    "replay_line",
    "SEED_RECORDS",
    "record_file",
    "seed_record",
    "seed_summary",
    "seed_report",
]

HASH_FIELD = "sha256"
#: The records' folder under ``data/``: ``data/ablations/<name>-<profile>.json``.
SEED_RECORDS = "ablations"
#: Rounding moves the fingerprint's losses by ~1e-6 across CPUs; a change, by far more.
CHECK_REL = 2e-3


class RecordError(ValueError):
    """A seed record that is unreadable, unsealed, or was edited after it was made."""


def record_digest(record: dict[str, Any]) -> str:
    """sha256 (hex) of ``record`` without its ``sha256`` field, as canonical JSON."""
    body = {k: v for k, v in record.items() if k != HASH_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as JSON would read it back, with its digest as the last field."""
    plain = json.loads(json.dumps({k: v for k, v in record.items() if k != HASH_FIELD}))
    return {**plain, HASH_FIELD: record_digest(plain)}


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Seal ``record`` and write it to ``path`` (indented JSON, written whole and renamed into
    place); returns the sealed record. Deterministic: the same record gives the same bytes."""
    path = Path(path)
    sealed = seal(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sealed, indent=1) + "\n")
    os.replace(tmp, path)
    return sealed


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The record at ``path`` after checking its seal; :class:`RecordError` naming the file
    if it is not a JSON object, has no ``sha256`` or its content does not hash to it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path} is not a readable seed record: {exc}") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} must hold a JSON object, got {type(record).__name__}")
    command = record.get("command", "the command in data/README.md")
    if HASH_FIELD not in record:
        raise RecordError(
            f"{path} has no {HASH_FIELD} field binding its content; remake it with `{command}`"
        )
    if record[HASH_FIELD] != record_digest(record):
        raise RecordError(
            f"{path} was changed after it was recorded: its content no longer "
            f"has the sha256 it was sealed with; remake it with `{command}`"
        )
    return record


# ----------------------------------------------------------------------------- comparing
def final_numbers(payload: dict[str, Any]) -> dict[str, float]:
    """An experiment's headline numbers: final validation perplexity per variant."""
    if payload["experiment"] == "window":
        return {f"W={r['window']}": r["val_perplexity"] for r in payload["results"]}
    return dict(payload["final_val_perplexity"])


def spread(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per label of ``runs`` (one dict of numbers per seed): mean, sample standard deviation
    (0 for one seed), min and max."""
    out = {}
    for label in runs[0]:
        values = [run[label] for run in runs]
        out[label] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return out


def compare(record: dict[str, Any], payload: dict[str, Any], rel: float = 0.02) -> dict[str, Any]:
    """``payload`` (a run) beside ``record``: ``{"record", "rows": [(label, this run, mean,
    std, min, max)], "matches": bool}``; ``matches`` says the run reproduces the record's own
    run of the same seed within ``rel``."""
    mine = final_numbers(payload)
    recorded = record["per_seed"].get(str(payload["seed"]))
    matches = recorded is not None and all(abs(mine[k] / recorded[k] - 1) <= rel for k in mine)
    rows = [
        (k, mine[k], v["mean"], v["std"], v["min"], v["max"]) for k, v in record["summary"].items()
    ]
    return {"record": record, "rows": rows, "matches": matches}


def report_lines(summary: dict[str, Any], payload: dict[str, Any]) -> str:
    """The chapter's lines for :func:`compare`'s result: this run, the seeds' mean and
    spread, and whether the gap between two variants exceeds that spread."""
    record = summary["record"]
    if not summary["matches"]:
        raise AssertionError(
            f"this run's numbers differ from the record's run of seed "
            f"{payload['seed']} by more than 2%: rerun `{record['command']}`"
        )
    lines = [f"{len(record['seeds'])} seeds ({record['command']}):"]
    shown = "seed 0" if "replayed" in payload else "this run"
    for label, mine, mean, std, lo, hi in summary["rows"]:
        lines.append(
            f"  {label:>8}: {shown} {mine:8.3f}; over the seeds {mean:8.3f} "
            f"+- {std:.3f} (min {lo:.3f}, max {hi:.3f})"
        )
    if len(summary["rows"]) == 2:
        (a_label, _, a_mean, a_std, *_), (b_label, _, b_mean, b_std, *_) = summary["rows"]
        gap, spread = abs(a_mean - b_mean), max(a_std, b_std)
        verdict = "larger than" if gap > 2 * spread else "within two standard deviations of"
        lines.append(
            f"  gap between the means {gap:.3f}: {verdict} the seed-to-seed spread ({spread:.3f})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- replaying
def replay_payload(
    record: dict[str, Any], label: str, seed: int, check: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """The recorded run of ``seed`` once ``check()`` (the same run's first steps, re-run here)
    gives the recorded fingerprint within :data:`CHECK_REL`; None when the record replays
    another seed or none. ``label`` names the record in messages. A mismatch raises
    ``AssertionError``: the record is stale, rerun its command."""
    recorded = record.get("replay")
    if recorded is None or recorded["payload"]["seed"] != seed:
        return None
    want, got = recorded["payload"]["check"], check()
    same_shape = (
        got["steps"] == want["steps"]
        and len(got["train_loss"]) == len(want["train_loss"])
        and len(got["val_loss"]) == len(want["val_loss"])
    )
    rel = [
        abs(g / w - 1)
        for w, g in zip(want["train_loss"] + want["val_loss"], got["train_loss"] + got["val_loss"])
    ]
    if not same_shape or max(rel) > CHECK_REL:
        raise AssertionError(
            f"{label} is stale: the first {want['steps']} steps of seed {seed} give losses "
            f"{got['train_loss']} / validation {got['val_loss']} here, the record "
            f"{want['train_loss']} / {want['val_loss']}; rerun `{record['command']}`"
        )
    payload = dict(recorded["payload"])
    payload["replayed"] = {
        "record": label,
        "command": record["command"],
        "checked_steps": got["steps"],
        "max_rel_difference": max(rel),
    }
    return payload


def replay_line(payload: dict[str, Any]) -> str:
    """One line for a chapter: whether this payload was trained here or replayed (and how it
    was checked)."""
    r = payload.get("replayed")
    if r is None:
        return f"trained here in {payload['seconds']:.0f} s"
    return (
        f"the recorded run of seed {payload['seed']} ({r['record']}, made by `{r['command']}`"
        f"); its first {r['checked_steps']} steps were re-run here and match it to "
        f"{r['max_rel_difference']:.1e} (pass live=True to train it here)"
    )


# ----------------------------------------------------------------------------- the book's records
def record_file(name: str, profile: str) -> str:
    return f"{name}-{profile}.json"


def seed_record(name: str, profile: str) -> dict[str, Any] | None:
    """``data/ablations/<name>-<profile>.json`` after checking its seal, or None when there is
    none or the loops are capped (a record is of full runs)."""
    path = Path(data_path(SEED_RECORDS)) / record_file(name, profile)
    if loop_cap() is not None or not path.exists():
        return None
    return read_record(path)


def seed_summary(payload: dict[str, Any], rel: float = 0.02) -> dict[str, Any] | None:
    """This run beside the recorded seeds of the same experiment and profile.

    Returns None when there is no record for this profile (or the loops are capped: the record
    is of full runs). Otherwise ``{"record", "rows": [(label, this run, mean, std, min, max)],
    "matches": bool}``, where ``matches`` says this run reproduces the record's own run of
    the same seed within ``rel`` (float rounding differs between CPUs; a different code or
    data would not stay within it). A record edited after it was made raises RecordError.
    """
    record = seed_record(payload["experiment"], payload["profile"])
    return None if record is None else compare(record, payload, rel)


def seed_report(payload: dict[str, Any]) -> str:
    """Lines for a chapter: this run, the recorded seeds' mean and spread, and whether the gap
    between two variants is larger than that spread. Raises if this run does not reproduce the
    record's own run of its seed (the record would be stale)."""
    summary = seed_summary(payload)
    if summary is None:
        name = f"{payload['experiment']}-{payload['profile']}.json"
        why = (
            "its loops are capped"
            if loop_cap() is not None
            else f"data/{SEED_RECORDS}/{name} has not been recorded"
        )
        return f"(no seed record to compare with: {why})"
    return report_lines(summary, payload)
