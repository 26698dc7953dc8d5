"""``seedbed compress`` / ``decompress``: range coding with the model's distribution.

This is the proof of a bpb number: if the model's predictions were not causal,
normalised and scored once, the file could not be decoded back byte for byte, and
the compressed size would not match the reported bpb.

The token stream is cut into ``streams`` equal segments coded side by side in one
batch (so each model step serves many tokens). Within a segment, contexts follow the
evaluator's sliding windows: when the model's context of C tokens is full, the state
is rebuilt from the last C - S + 1 tokens (S = stride), so every token sees between
C - S + 1 and C tokens, as in ``seedbed eval``. Encoder and decoder compute the
distribution through the same function with the same batch shapes, and quantise it
to integer frequencies (floor 1) before coding: both sides see identical tables.

Compressed file layout (little-endian)::

    0   magic b"SBZ1"
    4   u8   format version (1)
    5   u8   tokenizer mode (0 bytes, 1 SentencePiece)
    6   u16  streams
    8   32 B SHA-256 of the artifact the file was compressed with
    40  u64  original length in bytes
    48  u64  number of tokens
    56  32 B SHA-256 of the original bytes (decoding is checked against it)
    88  ...  range-coder words (u32)
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import constriction
import numpy as np
import torch

from seedbed.errors import UserError

MAGIC = b"SBZ1"
VERSION = 1
HEADER = struct.Struct("<4sBBH32sQQ32s")
FREQUENCY_BITS = 20  # each symbol's probability is a multiple of 2^-20, at least 2^-20


@dataclass
class CodecStats:
    original_bytes: int
    tokens: int
    payload_bytes: int
    seconds: float

    @property
    def bpb(self) -> float:
        """Payload bits (header aside) per byte of original text."""
        return 8 * self.payload_bytes / max(1, self.original_bytes)


def integer_frequencies(logits: torch.Tensor) -> np.ndarray:
    """Float logits (B, V) -> int64 frequencies (B, V), each >= 1: one code path for both sides."""
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    return np.floor(probs * (1 << FREQUENCY_BITS)).astype(np.int64) + 1


class Predictor:
    """Next-token frequencies for a batch of streams, fed one token per stream per call."""

    def __init__(self, model, streams: int, stride: int):
        self.model, self.streams = model, streams
        self.context = model.cfg.max_seq_len
        self.keep = self.context - stride + 1  # tokens kept when the window slides
        self.history: list[list[int]] = [[] for _ in range(streams)]
        self.state = None
        self.filled = 0
        self.vocab = model.cfg.vocab_size

    @torch.no_grad()
    def next_frequencies(self) -> np.ndarray:
        """Frequencies for the next token of every stream, given the tokens fed so far."""
        if not self.history[0]:
            return np.ones((self.streams, self.vocab), np.int64)  # no context yet: uniform
        if self.state is None or self.filled == self.context:
            # (Re)build the window from the last `keep` tokens (all of them at the start).
            window = [h[-self.keep:] if self.state is not None else h for h in self.history]
            self.state = self.model.init_state(self.streams, self.context)
            logits, self.state = self.model.step(torch.tensor(window), self.state)
            self.filled = len(window[0])
        else:
            logits, self.state = self.model.step(torch.tensor([[h[-1]] for h in self.history]), self.state)
            self.filled += 1
        return integer_frequencies(logits[:, -1])

    def feed(self, tokens: list[int]) -> None:
        for history, token in zip(self.history, tokens):
            history.append(token)


def segment(tokens: np.ndarray, streams: int) -> tuple[np.ndarray, int]:
    """Cut tokens into ``streams`` rows of equal length (the last padded with zeros)."""
    length = -(-len(tokens) // streams)
    padded = np.zeros(streams * length, np.int64)
    padded[:len(tokens)] = tokens
    return padded.reshape(streams, length), length


def code_positions(streams: int, length: int, n_tokens: int):
    """(position, mask of streams that hold a real token there), in coding order."""
    for p in range(length):
        real = np.arange(streams) * length + p < n_tokens
        yield p, real


def pick_streams(n_tokens: int, requested: int) -> int:
    """Segments of at least 2048 tokens: each segment start costs context, so short files use few."""
    return max(1, min(requested, n_tokens // 2048, 65535))


def compress_bytes(loaded, artifact_digest: bytes, data: bytes, streams: int = 64, stride: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> tuple[bytes, CodecStats]:
    start = time.perf_counter()
    tokens = loaded.encode(data).astype(np.int64) if data else np.zeros(0, np.int64)
    if loaded.tokenizer.decode(tokens) != data:
        raise UserError("this model's tokenizer cannot reproduce the input exactly (SentencePiece needs UTF-8 text); "
                        "use a model trained with the bytes tokenizer")
    streams = pick_streams(len(tokens), streams)
    encoder = constriction.stream.queue.RangeEncoder()
    if len(tokens):
        rows, length = segment(tokens, streams)
        predictor = Predictor(loaded.model, streams, stride or loaded.config.model.max_seq_len // 2)
        family = constriction.stream.model.Categorical(perfect=False)
        for p, real in code_positions(streams, length, len(tokens)):
            freqs = predictor.next_frequencies()
            symbols = rows[:, p]
            encoder.encode(symbols[real].astype(np.int32), family, freqs[real].astype(np.float64))
            predictor.feed(symbols.tolist())
            if progress:
                progress(p + 1, length)
    words = encoder.get_compressed().astype("<u4").tobytes()
    mode = 0 if loaded.tokenizer.name == "bytes" else 1
    header = HEADER.pack(MAGIC, VERSION, mode, streams, artifact_digest, len(data), len(tokens),
                         hashlib.sha256(data).digest())
    return header + words, CodecStats(len(data), len(tokens), len(words), time.perf_counter() - start)


def read_header(blob: bytes, artifact_digest: bytes) -> tuple:
    if len(blob) < HEADER.size or blob[:4] != MAGIC:
        raise UserError("not a seedbed-compressed file (bad magic or too short)")
    magic, version, mode, streams, digest, n_bytes, n_tokens, data_digest = HEADER.unpack_from(blob)
    if version != VERSION:
        raise UserError(f"compressed file has format version {version}; this seedbed reads {VERSION}")
    if digest != artifact_digest:
        raise UserError("the compressed file was made with a different artifact (checksum mismatch)")
    if (len(blob) - HEADER.size) % 4:
        raise UserError("the compressed file is truncated (payload is not whole 32-bit words)")
    return mode, streams, n_bytes, n_tokens, data_digest


def decompress_bytes(loaded, artifact_digest: bytes, blob: bytes, stride: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[bytes, CodecStats]:
    start = time.perf_counter()
    mode, streams, n_bytes, n_tokens, data_digest = read_header(blob, artifact_digest)
    if mode != (0 if loaded.tokenizer.name == "bytes" else 1):
        raise UserError("the compressed file's tokenizer mode does not match the artifact")
    words = np.frombuffer(blob[HEADER.size:], "<u4").astype(np.uint32)
    tokens = np.zeros(0, np.int64)
    if n_tokens:
        decoder = constriction.stream.queue.RangeDecoder(words)
        length = -(-n_tokens // streams)
        rows = np.zeros((streams, length), np.int64)
        predictor = Predictor(loaded.model, streams, stride or loaded.config.model.max_seq_len // 2)
        family = constriction.stream.model.Categorical(perfect=False)
        try:
            for p, real in code_positions(streams, length, n_tokens):
                freqs = predictor.next_frequencies()
                rows[real, p] = decoder.decode(family, freqs[real].astype(np.float64))
                predictor.feed(rows[:, p].tolist())
                if progress:
                    progress(p + 1, length)
        except (ValueError, RuntimeError, OverflowError, AssertionError):  # constriction asserts on invalid data
            raise UserError("the compressed file is corrupted or truncated (range decoding failed)") from None
        tokens = rows.reshape(-1)[:n_tokens]
    data = loaded.tokenizer.decode(tokens) if n_tokens else b""
    if len(data) != n_bytes or hashlib.sha256(data).digest() != data_digest:
        raise UserError("the compressed file is corrupted or truncated (decoded text fails its checksum)")
    return data, CodecStats(len(data), int(n_tokens), len(blob) - HEADER.size, time.perf_counter() - start)


def artifact_digest(path: str | Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()
