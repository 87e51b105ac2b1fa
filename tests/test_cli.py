"""``python -m gemma2_lite generate|chat`` on a random tiny checkpoint and the book's tokenizer,
and the policy every command line of the package follows (gemma2_lite.cmdline): one line on
stderr and status 2 for bad input, 130 on Ctrl-C at any moment (JAX's import included), 141 on
a closed pipe, never a traceback, nothing meant for stderr on stdout."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from random_models import random_model

from gemma2_lite import __main__ as cli
from gemma2_lite import get_config, paths
from gemma2_lite.chat import ChatSession
from gemma2_lite.checkpoint import load_hf, save_hf
from gemma2_lite.sampler import generate
from gemma2_lite.tokenizer import Tokenizer
from gemma2_lite.weights import book_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = paths.tokenizer_file()
CONFIG = get_config(
    "tiny",
    vocab_size=4096,
    d_model=36,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
    ffn_dim=52,
    query_pre_attn_scalar=10,
    sliding_window=7,
    max_seq_len=128,
    name="cli-test",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_hf(random_model(CONFIG, seed=0), path)
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--checkpoint",
        "--tokenizer",
        "--prompt",
        "--max-new-tokens",
        "--temperature",
        "--seed",
    ):
        assert flag in out


def test_generate_streams_the_sampler_output(
    checkpoint: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "ROMEO:\nWhat light"
    code = cli.main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--tokenizer",
            str(TOKENIZER),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--seed",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ids = tokenizer.encode(prompt, add_bos=True)
    new = generate(
        load_hf(checkpoint),
        [ids],
        max_new_tokens=12,
        temperature=0.9,
        seed=3,
        stop_tokens=[tokenizer.eos_id],
    )[0]
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    assert captured.out == prompt + text + "\n"
    assert "tokens in" in captured.err
    assert len(text) > 0


def test_chat_one_turn_and_interactive(
    checkpoint: Path,
    tokenizer: Tokenizer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = [
        "chat",
        "--checkpoint",
        str(checkpoint),
        "--tokenizer",
        str(TOKENIZER),
        "--max-new-tokens",
        "10",
        "--seed",
        "1",
    ]
    assert cli.main(args + ["--prompt", "Good morrow"]) == 0
    out = capsys.readouterr().out
    session = ChatSession(
        load_hf(checkpoint), tokenizer, max_new_tokens=10, temperature=0.7, seed=1
    )
    first = session.send("Good morrow")
    assert out == first + "\n"
    second = session.send("And to you")

    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\nAnd to you\n\n"))
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"model> {first}\n" in out and f"model> {second}\n" in out
    assert out.count("you> ") == 3


def test_default_is_the_shipped_book_model(capsys: pytest.CaptureFixture[str]) -> None:
    """No --checkpoint, no --tokenizer: weights.book_model(), the files in the package."""
    assert cli.main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    lm, tok = book_model(verbose=False)
    new = generate(
        lm,
        [tok.encode("ROMEO:", add_bos=True)],
        max_new_tokens=6,
        stop_tokens=[tok.eos_id],
        callback=lambda step, tokens: None,
    )[0]
    assert out == "ROMEO:" + tok.decode([t for t in new if t != tok.eos_id]) + "\n"
    assert capsys.readouterr().out == ""
    book_model()  # says what it loaded
    said = capsys.readouterr().out
    assert "the book's model" in said and "1,509,504 parameters" in said
    assert "shipped with the package (gemma2_lite/assets)" in said


def test_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    assert cli.main(["generate", "--checkpoint", str(missing), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "config.json" in err
    # A shipped file that is gone (a damaged install or checkout) names the file and says how
    # to restore it, not how to retrain it.
    monkeypatch.setattr(paths, "ASSETS", tmp_path / "assets")
    for args in (
        ["chat", "--prompt", "x"],
        ["chat", "--tokenizer", str(TOKENIZER), "--prompt", "x"],
    ):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the book's small model is missing" in err, err
        assert str(tmp_path / "assets" / "tiny-model" / "config.json") in err
        assert "git checkout -- " in err and "train-tiny" not in err


def test_bad_inputs(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "x"]
    assert cli.main(base + ["--tokenizer", str(tmp_path / "no.model")]) == 2
    assert "no.model not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + ["--tokenizer", str(TOKENIZER), "--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "argument --max-new-tokens: must be at least 1, got 0" in capsys.readouterr().err
    assert cli.main(base + ["--tokenizer", str(TOKENIZER), "--max-new-tokens", "500"]) == 2
    assert "context of 128" in capsys.readouterr().err
    small = tmp_path / "small-vocab"
    save_hf(random_model(CONFIG.replace(vocab_size=97), seed=1), small)
    assert (
        cli.main(
            ["generate", "--checkpoint", str(small), "--tokenizer", str(TOKENIZER), "--prompt", "x"]
        )
        == 2
    )
    assert "4096 pieces but the model only 97" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every CLI's policy
PROGRAMS = {  # each command line of the package, with arguments that get to work
    "main": ["-m", "gemma2_lite", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "4"],
    "script": [str(Path(sys.executable).parent / "gemma2-lite"), "generate", "--prompt", "x"],
    "experiments": [
        "-m",
        "gemma2_lite.book.experiments",
        "window",
        "--profile",
        "smoke",
        "--quiet",
    ],
    "fixtures": ["-m", "gemma2_lite.book.fixtures", "{tmp}/fixtures"],
    "tokenizer": ["-m", "gemma2_lite.book.tokenizer", "encode", "ROMEO:"],
}
# The import that is in progress when the test presses Ctrl-C: JAX's for the programs that
# import it, numpy's for the tokenizer's (it needs no JAX).
IMPORTING = {
    "main": "jax",
    "script": "jax",
    "experiments": "jax",
    "fixtures": "jax",
    "tokenizer": "numpy",
}


def _program(name: str, tmp_path: Path) -> list[str]:
    return [sys.executable, *(a.format(tmp=tmp_path) for a in PROGRAMS[name])]


def _stderr_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if not l.startswith("import time:")]


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT unblocked and at its default, as a shell starts a
    program. A pytest-xdist worker's thread can hold SIGINT blocked or ignored, and a child
    inherits both: the signal would then never arrive (the program would run to the end)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("name", PROGRAMS)
def test_ctrl_c_while_jax_imports_is_status_130_and_quiet(name: str, tmp_path: Path) -> None:
    """-X importtime reports each module as its import finishes: the first line for a jax
    (numpy) module means the import is under way, and Ctrl-C is sent right then."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", *_program(name, tmp_path)[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=_as_from_a_terminal,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(rf"\|\s+{IMPORTING[name]}(\.|$)", line):
            proc.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail(f"{name} never imported {IMPORTING[name]}: {''.join(seen)[-2000:]}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert out == "" and [l for l in _stderr_lines(err) if l.strip()] == [], err[-2000:]


def test_ctrl_c_during_generation_is_130(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("gemma2_lite.sampler.generate", interrupt)
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--prompt", "x"]) == 130
    assert capsys.readouterr().err.strip() == ""


def test_closed_pipe_is_141_without_a_word(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _program("main", tmp_path) + ["--max-new-tokens", "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    proc.stdout.read(3)  # like `| head -c 3`: read a little, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "error" not in err.lower(), err


def _with_closed(fd: int, command: list[str]) -> list[str]:
    """``command`` started with file descriptor ``fd`` closed, as ``2>&-`` does in a shell."""
    return ["sh", "-c", f'exec "$0" "$@" {fd}>&-' if fd else 'exec "$0" "$@" <&-', *command]


def test_closed_stderr_never_sends_errors_to_stdout(tmp_path: Path) -> None:
    """Started with fd 2 closed (``2>&-``), Python sets sys.stderr to None, and print(...,
    file=sys.stderr) would then write to stdout."""
    for args in (
        ["-m", "gemma2_lite", "generate", "--checkpoint", str(tmp_path / "no"), "--prompt", "x"],
        ["-m", "gemma2_lite.book.tokenizer", "train", "--out", "/no/x"],
        ["-m", "gemma2_lite", "generate", "--bad-option"],
    ):
        out = subprocess.run(
            _with_closed(2, [sys.executable, *args]),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout)


def test_missing_stderr_takes_nothing_from_stdout(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: sys.stderr is None (as Python sets it for ``2>&-``) while generating: the
    text on stdout, the status line nowhere."""
    monkeypatch.setattr(sys, "stderr", None)
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(checkpoint),
                "--tokenizer",
                str(TOKENIZER),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0.9",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and "tokens in" not in out, out


def test_closed_stdin_is_named(tmp_path: Path) -> None:
    out = subprocess.run(
        _with_closed(0, [sys.executable, "-m", "gemma2_lite", "generate"]),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 2 and out.stdout == "", out
    assert _stderr_lines(out.stderr) == [
        "error: stdin is closed, so there is no prompt to read; pass --prompt TEXT"
    ]


def test_an_unexpected_error_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bug(*args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_load", bug)
    monkeypatch.delenv("GEMMA2_LITE_DEBUG", raising=False)
    assert cli.main(["generate", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected ZeroDivisionError: a bug") and err.count("\n") == 1
    monkeypatch.setenv("GEMMA2_LITE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["generate", "--prompt", "x"])


def test_deeply_nested_config_json(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "nested"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    assert cli.main(["generate", "--checkpoint", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is nested too deeply" in err, err
    assert json.loads("[[1]]") == [[1]]  # the interpreter's recursion limit is intact
