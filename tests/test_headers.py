"""Headers that cannot hurt: every damaged header byte or truncation is one `error:` line, exit 2, nothing written.

Both file kinds are fuzzed through the CLI in-process: a packed artifact (read by ``info``
and ``compress``) and a file compressed with it (read by ``decompress``). Regression
tests then re-seal tampered headers with a valid CRC32, so the bounds checks themselves
are what reject them.
"""

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from seedbed import codec
from seedbed.cli import main
from seedbed.pack import artifact
from seedbed.pack.artifact import CODECS, QuantRule, seal
from seedbed.pack.pack import pack_model

TEXT = b"To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8
CUTS = ["empty", "inside-header", "after-header", "mid-payload", "last-byte-dropped"]


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A small artifact, a text, and the text compressed with the artifact: built once."""
    folder = tmp_path_factory.mktemp("headers")
    paths = {"artifact": folder / "tiny.seedbed", "text": folder / "text.txt", "compressed": folder / "text.sbz"}
    pack_model(tiny_model, paths["artifact"], QuantRule.parse("int8"))
    paths["text"].write_bytes(TEXT)
    assert main(["compress", str(paths["artifact"]), str(paths["text"]), "-o", str(paths["compressed"]),
                 "--no-eval"]) == 0
    return paths


def assert_one_error(capsys, argv: list[str], out: Path, *fragments: str) -> str:
    """Run the CLI in-process: exit code 2, one `error:` line on stderr, no file at ``out``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary left behind either
    return lines[0]


def damaged_variants(header_size: int) -> list[tuple[str, int | str]]:
    flips = [(f"xor-ff-{i}", i) for i in range(header_size)] + [(f"plus-one-{i}", i) for i in range(header_size)]
    return flips + [(f"cut-{cut}", cut) for cut in CUTS]


def damage(data: bytes, case: str, where: int | str, header_size: int) -> bytes:
    if case.startswith("xor-ff"):
        return data[:where] + bytes([data[where] ^ 0xFF]) + data[where + 1:]
    if case.startswith("plus-one"):
        return data[:where] + bytes([(data[where] + 1) % 256]) + data[where + 1:]
    cut = {"empty": 0, "inside-header": header_size // 2, "after-header": header_size,
           "mid-payload": (header_size + len(data)) // 2, "last-byte-dropped": len(data) - 1}[where]
    return data[:cut]


@pytest.mark.parametrize("case,where", damaged_variants(artifact.HEADER.size),
                         ids=[c for c, _ in damaged_variants(artifact.HEADER.size)])
def test_damaged_artifact_is_one_error_line(files, tmp_path, capsys, case, where):
    bad = tmp_path / "bad.seedbed"
    bad.write_bytes(damage(files["artifact"].read_bytes(), case, where, artifact.HEADER.size))
    out = tmp_path / "out.sbz"
    assert_one_error(capsys, ["info", str(bad)], out)
    assert_one_error(capsys, ["compress", str(bad), str(files["text"]), "-o", str(out), "--no-eval"], out)


@pytest.mark.parametrize("case,where", damaged_variants(codec.HEADER.size),
                         ids=[c for c, _ in damaged_variants(codec.HEADER.size)])
def test_damaged_compressed_file_is_one_error_line(files, tmp_path, capsys, case, where):
    bad = tmp_path / "bad.sbz"
    bad.write_bytes(damage(files["compressed"].read_bytes(), case, where, codec.HEADER.size))
    out = tmp_path / "out.txt"
    assert_one_error(capsys, ["decompress", str(files["artifact"]), str(bad), "-o", str(out)], out)


def test_undamaged_files_round_trip(files, tmp_path, capsys):
    out = tmp_path / "out.txt"
    assert main(["decompress", str(files["artifact"]), str(files["compressed"]), "-o", str(out)]) == 0
    assert out.read_bytes() == TEXT
    assert main(["info", str(files["artifact"])]) == 0
    assert f"= {artifact.HEADER.size} header + " in capsys.readouterr().out


def resealed(data: bytes, header: struct.Struct, fields: dict[int, tuple[str, int]]) -> bytes:
    """``data`` with header fields at byte offsets overwritten, and the header's CRC32 made valid again."""
    head = bytearray(data[:header.size])
    for offset, (fmt, value) in fields.items():
        struct.pack_into(fmt, head, offset, value)
    return seal(bytes(head)) + data[header.size:]


def decompress_tampered(files, tmp_path, capsys, fields: dict[int, tuple[str, int]], *fragments: str) -> None:
    bad = tmp_path / "bad.sbz"
    bad.write_bytes(resealed(files["compressed"].read_bytes(), codec.HEADER, fields))
    out = tmp_path / "out.txt"
    assert_one_error(capsys, ["decompress", str(files["artifact"]), str(bad), "-o", str(out)], out, *fragments)


# Byte offsets of compressed-file header fields (see seedbed.codec's docstring).
STREAMS, N_BYTES, N_TOKENS, PAYLOAD_LEN = 6, 40, 48, 88


def test_zero_streams_is_rejected(files, tmp_path, capsys):
    decompress_tampered(files, tmp_path, capsys, {STREAMS: ("<H", 0)}, "claims 0 streams")


def test_more_streams_than_tokens_is_rejected(files, tmp_path, capsys):
    decompress_tampered(files, tmp_path, capsys, {STREAMS: ("<H", len(TEXT) + 1)}, f"claims {len(TEXT) + 1} streams")


def test_two_to_the_forty_tokens_is_rejected(files, tmp_path, capsys):
    huge = 2**40
    # Bytes and tokens agree (bytes mode), so only the payload bound can refuse it.
    decompress_tampered(files, tmp_path, capsys, {N_BYTES: ("<Q", huge), N_TOKENS: ("<Q", huge)},
                        f"claims {huge:,} tokens", "payload holds at most")
    decompress_tampered(files, tmp_path, capsys, {N_TOKENS: ("<Q", huge)}, "corrupted")


def test_payload_length_must_match_the_file(files, tmp_path, capsys):
    size = files["compressed"].stat().st_size - codec.HEADER.size
    decompress_tampered(files, tmp_path, capsys, {PAYLOAD_LEN: ("<Q", size + 4)}, "truncated or has trailing bytes")
    decompress_tampered(files, tmp_path, capsys, {PAYLOAD_LEN: ("<Q", 2**63)}, "truncated or has trailing bytes")


def test_other_compressed_format_version_is_named(files, tmp_path, capsys):
    bad = tmp_path / "old.sbz"
    data = files["compressed"].read_bytes()
    bad.write_bytes(data[:4] + bytes([1]) + data[5:])
    out = tmp_path / "out.txt"
    assert_one_error(capsys, ["decompress", str(files["artifact"]), str(bad), "-o", str(out)], out,
                     f"format version 1; this seedbed reads version {codec.VERSION}")


FLAGS, RESERVED, EVERY, ITERATIONS, RESERVED2, LR = 96, 97, 98, 100, 102, 104


def test_cache_and_adaptation_fields_are_checked(files, tmp_path, capsys):
    # The test artifact has no n-gram cache, and the file was coded without adaptation.
    decompress_tampered(files, tmp_path, capsys, {FLAGS: ("<B", 4)}, "unknown flags or reserved bytes")
    decompress_tampered(files, tmp_path, capsys, {RESERVED2: ("<H", 1)}, "unknown flags or reserved bytes")
    decompress_tampered(files, tmp_path, capsys, {FLAGS: ("<B", 1)}, "n-gram cache this artifact does not have")
    decompress_tampered(files, tmp_path, capsys, {EVERY: ("<H", 32)}, "adaptation options without adaptation")
    decompress_tampered(files, tmp_path, capsys, {FLAGS: ("<B", 2), EVERY: ("<H", 0)},
                        "adaptation options out of range")
    decompress_tampered(files, tmp_path, capsys, {FLAGS: ("<B", 2), EVERY: ("<H", 8), LR: ("<d", float("nan"))},
                        "adaptation options out of range")


def test_unresealed_header_fails_its_checksum(files, tmp_path, capsys):
    data = bytearray(files["compressed"].read_bytes())
    data[STREAMS] ^= 1
    bad = tmp_path / "bad.sbz"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.txt"
    assert_one_error(capsys, ["decompress", str(files["artifact"]), str(bad), "-o", str(out)], out,
                     "header checksum mismatch")


CODEC_BYTE = 10  # offset of the artifact's payload codec id


@pytest.mark.parametrize("codec_id", [*CODECS, 4, 0xFF])
def test_flipped_codec_byte_is_rejected(files, tmp_path, capsys, codec_id):
    data = files["artifact"].read_bytes()
    if codec_id == data[CODEC_BYTE]:
        pytest.skip("the artifact's own codec")
    bad = tmp_path / "bad.seedbed"
    bad.write_bytes(resealed(data, artifact.HEADER, {CODEC_BYTE: ("<B", codec_id)}))
    expected = "unknown payload codec" if codec_id not in CODECS else "corrupted"
    assert_one_error(capsys, ["info", str(bad)], tmp_path / "none", expected)


def test_artifact_lengths_and_reserved_byte_are_checked(files, tmp_path, capsys):
    data = files["artifact"].read_bytes()
    bad = tmp_path / "bad.seedbed"
    for fields, fragment in [({11: ("<B", 1)}, "reserved header byte"),
                             ({20: ("<Q", 2**40)}, "truncated or has trailing bytes"),
                             ({12: ("<Q", 2**40)}, "does not decompress to 1,099,511,627,776 bytes"),
                             ({8: ("<H", 1)}, "format version 1; this seedbed reads version 2")]:
        bad.write_bytes(resealed(data, artifact.HEADER, fields))
        assert_one_error(capsys, ["info", str(bad)], tmp_path / "none", fragment)


def test_real_process_prints_one_line(files, tmp_path):
    """Two cases through a real ``python -m seedbed``: no traceback escapes main()."""
    bad_artifact = tmp_path / "bad.seedbed"
    bad_artifact.write_bytes(resealed(files["artifact"].read_bytes(), artifact.HEADER, {CODEC_BYTE: ("<B", 0xFF)}))
    bad_compressed = tmp_path / "bad.sbz"
    bad_compressed.write_bytes(resealed(files["compressed"].read_bytes(), codec.HEADER, {STREAMS: ("<H", 0)}))
    out = tmp_path / "out.txt"
    for argv in (["info", str(bad_artifact)],
                 ["decompress", str(files["artifact"]), str(bad_compressed), "-o", str(out)]):
        result = subprocess.run([sys.executable, "-m", "seedbed", *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert not out.exists()
