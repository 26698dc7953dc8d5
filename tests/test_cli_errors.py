"""Bad input through the CLI: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
from pathlib import Path

import pytest

from run_cli import seedbed

TINY = ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=2", "train.dtype=fp32"]




def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 200)
    return path


def train_into(out: Path, *args: str) -> subprocess.CompletedProcess:
    return seedbed("train", "--out", str(out), "--steps", "1", "--no-progress", *args, "train.device=cpu")


def test_missing_data_path(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(train_into(out, "--data", str(tmp_path / "nope")), "does not exist")
    assert not out.exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    out = tmp_path / "run"
    assert_one_line_error(train_into(out, "--data", str(tmp_path / "empty")), "empty")
    assert not out.exists()


def test_corpus_smaller_than_one_context(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words only, well under one context of text\n" * 2)
    out = tmp_path / "run"
    assert_one_line_error(train_into(out, "--data", str(small)), "fewer than one context of 128")
    assert not out.exists()


def test_non_utf8_corpus_with_sentencepiece(tmp_path, text_file):
    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "a.txt").write_bytes(text_file.read_bytes() + "café".encode("latin-1"))
    out = tmp_path / "run"
    assert_one_line_error(train_into(out, "--data", str(bad), "data.tokenizer=sp", *TINY), "UTF-8")
    assert not out.exists()


def test_non_utf8_corpus_is_fine_with_bytes(tmp_path, text_file):
    data = tmp_path / "latin1.txt"
    data.write_bytes(text_file.read_bytes() + "café".encode("latin-1") * 100)
    result = train_into(tmp_path / "run", "--data", str(data), *TINY)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args,fragments", [
    (["--preset", "gpt-9000"], ["unknown preset 'gpt-9000'", "available"]),
    (["model.widht=128"], ["unknown config key model.widht"]),
    (["model.d_model=0"], ["model.d_model must be positive"]),
    (["train.batch_size=-4"], ["train.batch_size must be positive"]),
    (["model.mixer.n_heads=5"], ["n_heads=5 does not divide model.d_model=128"]),
    (["model.ffn.kind=kan9"], ["unknown ffn 'kan9'"]),
    (["--config", "/nonexistent.toml"], ["config file /nonexistent.toml does not exist"]),
])
def test_bad_configuration(tmp_path, text_file, args, fragments):
    out = tmp_path / "run"
    assert_one_line_error(train_into(out, "--data", str(text_file), *args), *fragments)
    assert not out.exists()


def test_resume_from_folder_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(seedbed("train", "--resume", str(tmp_path / "run")), "not a run folder")
    (tmp_path / "run" / "config.toml").write_text("[train]\nsteps = 3\n")
    assert_one_line_error(seedbed("train", "--resume", str(tmp_path / "run")), "has no checkpoint.safetensors")


def test_corrupted_and_truncated_checkpoints(tmp_path, text_file):
    run = tmp_path / "run"
    assert train_into(run, "--data", str(text_file), *TINY).returncode == 0
    checkpoint = run / "checkpoint.safetensors"
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit deep in the tensor data
    checkpoint.write_bytes(bytes(data))
    assert_one_line_error(seedbed("eval", str(run)), "corrupted")
    assert_one_line_error(seedbed("train", "--resume", str(run)), "corrupted")
    checkpoint.write_bytes(bytes(data[: len(data) // 2]))
    assert_one_line_error(seedbed("generate", str(run), "--prompt", "x"), "corrupted")


def test_training_into_an_existing_run_is_refused(tmp_path, text_file):
    run = tmp_path / "run"
    assert train_into(run, "--data", str(text_file), *TINY).returncode == 0
    assert_one_line_error(train_into(run, "--data", str(text_file), *TINY), "--resume")


def test_eval_and_generate_bad_input(tmp_path, text_file):
    assert_one_line_error(seedbed("eval", str(tmp_path / "missing-run")), "does not exist")
    run = tmp_path / "run"
    assert train_into(run, "--data", str(text_file), *TINY).returncode == 0
    assert_one_line_error(seedbed("eval", str(run), "--text", str(tmp_path / "nope.txt")), "does not exist")
    assert_one_line_error(seedbed("generate", str(run), "--prompt", ""), "prompt is empty")
    assert_one_line_error(seedbed("generate", str(run), "--prompt", "a", "--top-p", "0"), "top-p")
    assert_one_line_error(seedbed("generate", str(run), "--prompt", "a", "--tokens", "0"), "must be positive")
