"""Tokenizers: raw bytes, or SentencePiece BPE trained on the train split.

Token ids are always ``numpy.uint16`` arrays (the shard format stores
uint16, and no vocabulary here exceeds 65536); convert with
``.astype(numpy.int64)`` before indexing an embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from seedbed.errors import UserError

from seedbed.fileio import atomic_write

from .cache import cache_dir
from .corpus import Document

TOKEN_DTYPE = np.uint16
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1

# Settings under which decode(encode(text)) == text for any UTF-8 text: no
# normalization, no invented or collapsed whitespace, unknown characters
# spelled as bytes. They are part of the trained model's cache key.
SP_TRAINER_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_by_whitespace": True,
    "allow_whitespace_only_pieces": True,  # runs of spaces (code indentation) become single pieces
    "character_coverage": 0.9995,
    "unk_id": 0,
    "bos_id": -1,
    "eos_id": -1,
    "pad_id": -1,
    "max_sentence_length": 8192,  # bytes; longer lines are cut to SP_MAX_LINE_CHARS below
    "input_sentence_size": 0,  # we subsample ourselves, deterministically
}
SP_MAX_LINE_CHARS = 2048  # at most 4 bytes each: stays under max_sentence_length
SP_MAX_SENTENCES = 2_000_000  # keeps training to seconds on big corpora
# SentencePiece writes spaces as this "meta space" character, so a literal one
# in the text would come back as a space; such characters are encoded as bytes.
META_SPACE = "\u2581"
ROUND_TRIP_PROBE = "  Two  spaces,\ttab\r\nline\n\n naïve — 日本語 🙂 \u2581 \x01 end "


class Tokenizer(ABC):
    """Maps bytes to uint16 token ids and back, exactly."""

    name: str  # "bytes" or "sp"
    vocab_size: int
    model_proto: bytes | None  # serialized SentencePiece model, for storing in artifacts

    @abstractmethod
    def encode(self, data: bytes) -> np.ndarray: ...

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> bytes: ...

    @abstractmethod
    def count_bytes(self, ids: np.ndarray) -> int:
        """``len(self.decode(ids))`` without building the bytes: the bits-per-byte denominator."""

    @abstractmethod
    def byte_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bytes each token decodes to (int64, one per id): where each token sits in the text."""

    @property
    @abstractmethod
    def surfaces(self) -> list[bytes]:
        """The bytes each token id decodes to, by id."""

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``bytes`` or ``sp (vocab 1024)``."""
        return self.name if self.name == "bytes" else f"{self.name} (vocab {self.vocab_size})"

    def _checked_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(ids).ravel()
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.vocab_size}) for tokenizer {self.label}")
        return array


class ByteTokenizer(Tokenizer):
    """One token per byte; accepts any bytes, UTF-8 or not."""

    name = "bytes"
    vocab_size = 256
    model_proto = None

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)

    def decode(self, ids: Sequence[int] | np.ndarray) -> bytes:
        return self._checked_ids(ids).astype(np.uint8).tobytes()

    def count_bytes(self, ids: np.ndarray) -> int:
        return int(self._checked_ids(ids).size)

    def byte_lengths(self, ids: np.ndarray) -> np.ndarray:
        return np.ones(self._checked_ids(ids).size, dtype=np.int64)

    @property
    def surfaces(self) -> list[bytes]:
        return [bytes([value]) for value in range(256)]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with byte fallback that reproduces UTF-8 text byte for byte.

    Models are checked on load: they must have byte pieces and round-trip a
    probe with odd whitespace, so a foreign ``sp:/path`` model that normalizes
    text is refused rather than silently skewing bits per byte.
    """

    name = "sp"

    def __init__(self, model_proto: bytes, source: str = "SentencePiece model"):
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise UserError(f"{source} is not a valid SentencePiece model; train one with tokenizer=sp") from None
        self.model_proto = model_proto
        self.vocab_size = self._processor.get_piece_size()
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise UserError(
                f"{source} has {self.vocab_size} pieces; seedbed stores uint16 ids, so use at most {MAX_VOCAB_SIZE}"
            )
        self._piece_bytes = [self._bytes_of_piece(piece_id) for piece_id in range(self.vocab_size)]
        self._piece_lengths = np.array([len(piece) for piece in self._piece_bytes], dtype=np.int64)
        byte_ids = [self._processor.piece_to_id(f"<0x{value:02X}>") for value in range(256)]
        if not all(self._processor.is_byte(piece_id) for piece_id in byte_ids):
            raise UserError(
                f"{source} was trained without byte_fallback, so it loses unseen characters; use tokenizer=sp"
            )
        self._meta_space_ids = [byte_ids[value] for value in META_SPACE.encode()]
        if self.decode(self.encode(ROUND_TRIP_PROBE.encode())) != ROUND_TRIP_PROBE.encode():
            raise UserError(
                f"{source} does not reproduce whitespace exactly (needs identity normalization, no dummy prefix, "
                "no whitespace removal); use tokenizer=sp to train a suitable one"
            )

    @classmethod
    def from_file(cls, path: Path) -> SentencePieceTokenizer:
        path = path.expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer model {path} does not exist; check the path after sp:")
        return cls(path.read_bytes(), source=f"tokenizer model {path}")

    def encode(self, data: bytes) -> np.ndarray:
        ids: list[int] = []
        for index, chunk in enumerate(decode_utf8(data, "text").split(META_SPACE)):
            if index:
                ids += self._meta_space_ids
            ids += self._processor.encode(chunk)
        return np.array(ids, dtype=TOKEN_DTYPE)

    def decode(self, ids: Sequence[int] | np.ndarray) -> bytes:
        # Our own piece table rather than SentencePiece's decode: it gives the
        # exact bytes even for id sequences that are not valid UTF-8.
        return b"".join(map(self._piece_bytes.__getitem__, self._checked_ids(ids).tolist()))

    def count_bytes(self, ids: np.ndarray) -> int:
        return int(self._piece_lengths[self._checked_ids(ids)].sum())

    def byte_lengths(self, ids: np.ndarray) -> np.ndarray:
        return self._piece_lengths[self._checked_ids(ids)]

    @property
    def surfaces(self) -> list[bytes]:
        return list(self._piece_bytes)

    def _bytes_of_piece(self, piece_id: int) -> bytes:
        piece = self._processor.id_to_piece(piece_id)
        if self._processor.is_byte(piece_id):
            return bytes([int(piece[3:5], 16)])  # "<0xAB>"
        if self._processor.is_control(piece_id):
            return b""
        if self._processor.is_unknown(piece_id):
            return " \u2047 ".encode()  # what SentencePiece itself prints for unknown pieces
        return piece.replace(META_SPACE, " ").encode()


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as text, or a UserError naming ``name`` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{name} is not valid UTF-8 (byte offset {error.start}); SentencePiece needs UTF-8 text: "
            "convert it, or use tokenizer=bytes"
        ) from None


def make_tokenizer(spec: str, train_docs: Sequence[Document], vocab_size: int) -> Tokenizer:
    """``bytes``, ``sp`` (trained on ``train_docs``, cached) or ``sp:/path/to/file.model``."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "sp":
        return train_sentencepiece(train_docs, vocab_size)
    if spec.startswith("sp:"):
        return SentencePieceTokenizer.from_file(Path(spec[len("sp:") :]))
    raise UserError(
        f"unknown tokenizer {spec!r}: use 'bytes', 'sp' (train SentencePiece BPE on the train split) "
        "or 'sp:/path/to/file.model'"
    )


def tokenizer_from_proto(model_proto: bytes | None) -> Tokenizer:
    """Rebuild a tokenizer from its stored ``model_proto`` (None means bytes)."""
    return ByteTokenizer() if model_proto is None else SentencePieceTokenizer(model_proto)


def train_sentencepiece(train_docs: Sequence[Document], vocab_size: int) -> SentencePieceTokenizer:
    """Train BPE on the documents, or reuse the model cached for the same text and settings."""
    if not 257 < vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} does not suit sp: it needs more than 257 (256 bytes + unknown) "
            f"and at most {MAX_VOCAB_SIZE}; try 1024"
        )
    texts = [decode_utf8(doc.data, doc.name) for doc in train_docs]
    settings = {"trainer": SP_TRAINER_OPTIONS, "max_line_chars": SP_MAX_LINE_CHARS, "max_sentences": SP_MAX_SENTENCES}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in train_docs:
        key.update(len(doc.data).to_bytes(8, "little"))
        key.update(doc.data)
    model_path = cache_dir() / "tokenizers" / f"sp-{vocab_size}-{key.hexdigest()[:16]}.model"
    if model_path.is_file():
        return SentencePieceTokenizer(model_path.read_bytes(), source=f"cached tokenizer {model_path}")

    sentences = _training_sentences(texts)
    if not sentences:
        raise UserError("the train split has no text to train SentencePiece on; use more data or tokenizer=bytes")
    print(f"seedbed: training a {vocab_size}-piece SentencePiece tokenizer on {len(sentences)} lines", file=sys.stderr)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # silence the trainer's progress log
            **SP_TRAINER_OPTIONS,
        )
    except RuntimeError as error:
        # Keep SentencePiece's reason, without its source location or advice about its own flags.
        reason = str(error).rsplit("] ", 1)[-1].split(" Increase vocab_size or decrease")[0].rstrip(". ")
        raise UserError(
            f"SentencePiece training with vocab_size {vocab_size} failed: {reason}; change vocab_size or use more text"
        ) from None
    with atomic_write(model_path) as file:
        file.write(model.getvalue())
    return SentencePieceTokenizer(model.getvalue(), source=f"trained tokenizer {model_path}")


def _training_sentences(texts: Sequence[str]) -> list[str]:
    """Non-empty lines, long ones cut into pieces, evenly subsampled when there are too many.

    Subsampling here rather than with SentencePiece's random shuffle keeps
    the learned pieces identical on every machine.
    """
    sentences = [
        line[start : start + SP_MAX_LINE_CHARS]
        for text in texts
        for line in text.split("\n")
        for start in range(0, len(line), SP_MAX_LINE_CHARS)
    ]
    stride = math.ceil(len(sentences) / SP_MAX_SENTENCES)
    return sentences[::stride] if stride > 1 else sentences
