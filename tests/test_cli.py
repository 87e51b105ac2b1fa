"""``python -m gemma2_lite generate|chat`` on a random tiny checkpoint and the book's tokenizer."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gemma2_lite import __main__ as cli, get_config
from gemma2_lite.chat import ChatSession
from gemma2_lite.checkpoint import load_hf, save_hf
from gemma2_lite.profile import data_path
from gemma2_lite.sampler import generate
from gemma2_lite.tokenizer import Tokenizer

from random_models import random_model

TOKENIZER = Path(data_path("tokenizer.model"))
CONFIG = get_config("tiny", vocab_size=4096, d_model=36, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=10, ffn_dim=52, query_pre_attn_scalar=10,
                    sliding_window=7, max_seq_len=128, name="cli-test")


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
    for flag in ("--checkpoint", "--tokenizer", "--prompt", "--max-new-tokens", "--temperature",
                 "--seed"):
        assert flag in out


def test_generate_streams_the_sampler_output(checkpoint: Path, tokenizer: Tokenizer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "ROMEO:\nWhat light"
    code = cli.main(["generate", "--checkpoint", str(checkpoint), "--tokenizer", str(TOKENIZER),
                     "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0.9",
                     "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    ids = tokenizer.encode(prompt, add_bos=True)
    new = generate(load_hf(checkpoint), [ids], max_new_tokens=12, temperature=0.9, seed=3,
                   stop_tokens=[tokenizer.eos_id])[0]
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    assert captured.out == prompt + text + "\n"
    assert "tokens in" in captured.err
    assert len(text) > 0


def test_chat_one_turn_and_interactive(checkpoint: Path, tokenizer: Tokenizer,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["chat", "--checkpoint", str(checkpoint), "--tokenizer", str(TOKENIZER),
            "--max-new-tokens", "10", "--seed", "1"]
    assert cli.main(args + ["--prompt", "Good morrow"]) == 0
    out = capsys.readouterr().out
    session = ChatSession(load_hf(checkpoint), tokenizer, max_new_tokens=10, temperature=0.7,
                          seed=1)
    first = session.send("Good morrow")
    assert out == first + "\n"
    second = session.send("And to you")

    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\nAnd to you\n\n"))
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"model> {first}\n" in out and f"model> {second}\n" in out
    assert out.count("you> ") == 3


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    assert cli.main(["generate", "--checkpoint", str(missing), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "config.json" in err
    # The default (the book's model, not trained yet) says how to make it.
    monkeypatch.setattr(cli, "data_path", lambda *parts: tmp_path.joinpath(*parts))
    assert cli.main(["chat", "--tokenizer", str(TOKENIZER), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "python -m gemma2_lite.experiments train-tiny" in err


def test_bad_inputs(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "x"]
    assert cli.main(base + ["--tokenizer", str(tmp_path / "no.model")]) == 2
    assert "no.model not found" in capsys.readouterr().err
    assert cli.main(base + ["--tokenizer", str(TOKENIZER), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert cli.main(base + ["--tokenizer", str(TOKENIZER), "--max-new-tokens", "500"]) == 2
    assert "context of 128" in capsys.readouterr().err
    small = tmp_path / "small-vocab"
    save_hf(random_model(CONFIG.replace(vocab_size=97), seed=1), small)
    assert cli.main(["generate", "--checkpoint", str(small), "--tokenizer", str(TOKENIZER),
                     "--prompt", "x"]) == 2
    assert "4096 pieces but the model only 97" in capsys.readouterr().err
