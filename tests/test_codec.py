"""Compression with the model: byte-exact round trips, and coded size == eval bpb."""

import subprocess
import sys

import numpy as np
import pytest

from seedbed.codec import artifact_digest, compress_bytes, decompress_bytes
from seedbed.config import resolve_config
from seedbed.data import load_documents, split_documents
from seedbed.errors import UserError
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.runs import load
from seedbed.train.trainer import Trainer


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "tiny.seedbed"
    pack_model(tiny_model, path, QuantRule.parse("int8"))
    return path, load_artifact(path), artifact_digest(path)


@pytest.fixture(scope="module")
def long_text():
    """Over 100 kB of held-out Shakespeare (the default val split)."""
    _, val, _ = split_documents(load_documents("default"))
    return b"".join(doc.data for doc in val)[:110_000]


def round_trip(artifact, data: bytes, **kwargs) -> tuple[bytes, object]:
    _, loaded, digest = artifact
    blob, stats = compress_bytes(loaded, digest, data, **kwargs)
    back, _ = decompress_bytes(loaded, digest, blob)
    assert back == data
    return blob, stats


@pytest.mark.parametrize("data", [
    b"",
    b"A",
    "Naïve café — 日本語のテキスト 🙂\n\ttabs and  spaces\r\n".encode() * 30,
    bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    bytes(range(256)) * 40,
], ids=["empty", "one-byte", "utf8", "random-bytes", "all-bytes"])
def test_round_trip_is_byte_exact(artifact, data):
    round_trip(artifact, data)


def test_long_text_round_trip_matches_eval_bpb(artifact, long_text):
    _, loaded, _ = artifact
    blob, stats = round_trip(artifact, long_text)
    assert stats.tokens == len(long_text) and stats.original_bytes == len(long_text)
    evaluated = loaded.evaluate(long_text)
    assert abs(stats.bpb / evaluated.bpb - 1) < 0.01, (stats.bpb, evaluated.bpb)
    # A trained model compresses held-out English text: well under 8 bits per byte.
    assert stats.bpb < 4.5


def test_compression_is_deterministic(artifact, long_text):
    _, loaded, digest = artifact
    first, _ = compress_bytes(loaded, digest, long_text[:30_000])
    second, _ = compress_bytes(loaded, digest, long_text[:30_000])
    assert first == second


def test_mismatched_artifact_and_damaged_files_are_rejected(artifact, tiny_model, tmp_path, long_text):
    path, loaded, digest = artifact
    blob, _ = compress_bytes(loaded, digest, long_text[:20_000])
    other = tmp_path / "other.seedbed"
    pack_model(tiny_model, other, QuantRule.parse("fp32"))
    with pytest.raises(UserError, match="different artifact"):
        decompress_bytes(load_artifact(other), artifact_digest(other), blob)
    with pytest.raises(UserError, match="truncated"):
        decompress_bytes(loaded, digest, blob[:-6])
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    with pytest.raises(UserError, match="corrupted"):
        decompress_bytes(loaded, digest, bytes(damaged))
    with pytest.raises(UserError, match="not a seedbed-compressed file"):
        decompress_bytes(loaded, digest, b"xz\x00\x00 something else")


def test_sentencepiece_model_round_trip_and_refuses_binary(small_corpus, tmp_path):
    cfg = resolve_config("gpt", overrides=[
        "model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=4", "train.steps=3", "train.dtype=fp32", "train.device=cpu", 'data.tokenizer="sp"', "data.vocab_size=512",
        f'data.spec="{small_corpus}"'])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    path = tmp_path / "sp.seedbed"
    pack_model(load(tmp_path / "run"), path, QuantRule.parse("int8"))
    loaded, digest = load_artifact(path), artifact_digest(path)
    text = "Friends, Romans, countrymen — lend me your ears; naïve 日本\n".encode() * 50
    blob, stats = compress_bytes(loaded, digest, text)
    assert stats.tokens < len(text)  # SentencePiece pieces span several bytes
    assert decompress_bytes(loaded, digest, blob)[0] == text
    with pytest.raises(UserError, match="not valid UTF-8"):
        compress_bytes(loaded, digest, b"\xff\xfe binary \x00")


def test_cli_compress_decompress(artifact, long_text, tmp_path):
    path, _, _ = artifact
    source = tmp_path / "in.txt"
    source.write_bytes(long_text[:40_000])
    packed = tmp_path / "in.sbz"
    out = subprocess.run([sys.executable, "-m", "seedbed", "compress", str(path), str(source), "-o", str(packed)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "seedbed eval on the same text" in out.stdout and "bytes/s" in out.stdout
    restored = tmp_path / "out.txt"
    back = subprocess.run([sys.executable, "-m", "seedbed", "decompress", str(path), str(packed), "-o", str(restored)],
                          capture_output=True, text=True, timeout=600)
    assert back.returncode == 0, back.stderr
    assert restored.read_bytes() == source.read_bytes()
    missing = subprocess.run([sys.executable, "-m", "seedbed", "compress", str(path), str(tmp_path / "nope"), "-o",
                              str(packed)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: input file")
