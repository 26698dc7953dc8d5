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

With the artifact's n-gram cache (``cachemix.py``) the distribution is the gated mixture of
model and cache; with ``adapt`` the cache, the gate and optionally the model learn from each
block of tokens after it is coded (``adapt.py``), and the decoder replays the same updates.
The header records both, so decoding needs no options.

Compressed file layout (little-endian), format version 5::

    0   4 B  magic b"SBZ1"
    4   u8   format version (5: the adapting gate reads the text context; 4: it did not)
    5   u8   tokenizer mode: 0 bytes, 1 SentencePiece (must match the artifact's)
    6   u16  streams: 1 to max(1, number of tokens)
    8   32 B SHA-256 of the artifact the file was compressed with
    40  u64  original length in bytes (= the number of tokens in bytes mode; 0 only if no tokens)
    48  u64  number of tokens (at most what the payload can hold, see ``max_tokens``)
    56  32 B SHA-256 of the original bytes (decoding is checked against it)
    88  u64  payload length in bytes: whole u32 words, = file size - 116
    96  u8   flags: bit 0 the artifact's n-gram cache is mixed in, bit 1 adaptation (others 0)
    97  u8   reserved, 0
    98  u16  adaptation: positions per stream between updates (0 without adaptation)
    100 u16  adaptation: L-BFGS iterations refitting the gate per update
    102 u16  reserved, 0
    104 f64  adaptation: the model's Adam learning rate (0: the model is not updated; the very
             float the encoder used, so the decoder's updates are the same to the bit)
    112 u32  CRC32 of header bytes 0-111
    116 ...  payload: range-coder words (u32)

A reader checks the magic and the version first (they say what the rest is), then the
header's CRC32, then every field against the artifact and the file size, before it
allocates or decodes anything.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import constriction
import numpy as np
import torch

from seedbed.adapt import AdaptOptions, StreamScorer
from seedbed.errors import UserError
from seedbed.pack.artifact import seal

MAGIC = b"SBZ1"
VERSION = 5
HEADER = struct.Struct("<4sBBH32sQQ32sQBBHHHdI")  # the fields above, then the CRC32 of the bytes before it
FREQUENCY_BITS = 20  # each symbol's probability is a multiple of 2^-20, at least 2^-20
CODER_PRECISION = 24  # constriction's categorical models give every symbol at least 2^-24
FLUSH_BITS = 64  # the coder's final state: bits a payload may lack beyond those of its tokens
FLAG_CACHE, FLAG_ADAPT = 1, 2


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


def integer_frequencies(probs: torch.Tensor) -> np.ndarray:
    """Float64 probabilities (B, V) -> int64 frequencies (B, V), each >= 1: one code path for both sides."""
    return np.floor(probs.numpy() * (1 << FREQUENCY_BITS)).astype(np.int64) + 1


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


def max_tokens(payload_bytes: int, vocab: int) -> int:
    """The most tokens a payload of ``payload_bytes`` can hold with a vocabulary of ``vocab``.

    The coder leaves each of the other V - 1 symbols at least 2^-24, so no token costs less
    than -log2(1 - (V - 1) 2^-24) bits, and the payload holds all their bits but the final
    state's.
    """
    if vocab < 2:
        return 2**64 - 1  # a lone symbol costs nothing: any count fits
    min_bits = -math.log2(1 - (vocab - 1) / 2 ** CODER_PRECISION)
    return math.floor((8 * payload_bytes + FLUSH_BITS) / min_bits)


def pick_streams(n_tokens: int, requested: int) -> int:
    """Segments of at least 2048 tokens: each segment start costs context, so short files use few."""
    return max(1, min(requested, n_tokens // 2048, 65535))


def tokenizer_mode(loaded) -> int:
    """The header's tokenizer mode: 0 bytes, 1 SentencePiece."""
    return 0 if loaded.tokenizer.name == "bytes" else 1


def scorer_for(loaded, streams: int, stride: int, use_cache: bool, adapt: AdaptOptions | None,
               length: int) -> StreamScorer:
    cache = loaded.cache if use_cache else None
    return StreamScorer(loaded.model, streams, stride or loaded.config.model.max_seq_len // 2, cache, adapt, length,
                        loaded.tokenizer.surfaces)


def compress_bytes(loaded, artifact_digest: bytes, data: bytes, streams: int = 64, stride: int = 0,
                   progress: Callable[[int, int], None] | None = None, use_cache: bool = True,
                   adapt: AdaptOptions | None = None) -> tuple[bytes, CodecStats]:
    """``data`` coded with ``loaded``'s model, mixed with its n-gram cache when it has one and
    ``use_cache``, adapting as ``adapt`` says (None: not at all)."""
    start = time.perf_counter()
    use_cache = use_cache and loaded.cache is not None
    if adapt is not None:
        adapt.check()
    tokens = loaded.encode(data).astype(np.int64) if data else np.zeros(0, np.int64)
    if loaded.tokenizer.decode(tokens) != data:
        raise UserError("this model's tokenizer cannot reproduce the input exactly (SentencePiece needs UTF-8 text); "
                        "use a model trained with the bytes tokenizer")
    streams = pick_streams(len(tokens), streams)
    encoder = constriction.stream.queue.RangeEncoder()
    if len(tokens):
        rows, length = segment(tokens, streams)
        scorer = scorer_for(loaded, streams, stride, use_cache, adapt, length)
        family = constriction.stream.model.Categorical(perfect=False)
        for p, real in code_positions(streams, length, len(tokens)):
            freqs = integer_frequencies(scorer.next_probs())
            symbols = rows[:, p]
            encoder.encode(symbols[real].astype(np.int32), family, freqs[real].astype(np.float64))
            scorer.feed(symbols, real)
            if progress:
                progress(p + 1, length)
    words = encoder.get_compressed().astype("<u4").tobytes()
    flags = (FLAG_CACHE if use_cache else 0) | (FLAG_ADAPT if adapt is not None else 0)
    header = HEADER.pack(MAGIC, VERSION, tokenizer_mode(loaded), streams, artifact_digest, len(data), len(tokens),
                         hashlib.sha256(data).digest(), len(words), flags, 0,
                         adapt.every if adapt else 0, adapt.mixer_iterations if adapt else 0, 0,
                         adapt.model_lr if adapt else 0.0, 0)
    return seal(header) + words, CodecStats(len(data), len(tokens), len(words), time.perf_counter() - start)


@dataclass
class HeaderFields:
    """The fields of a compressed file's header that decoding needs."""

    streams: int
    n_bytes: int
    n_tokens: int
    data_digest: bytes
    use_cache: bool
    adapt: AdaptOptions | None


def read_header(blob: bytes, artifact_digest: bytes, mode: int, vocab: int, has_cache: bool) -> HeaderFields:
    """The header of a compressed file, checked against itself, the file size and the artifact
    (its digest, tokenizer ``mode``, ``vocab`` and whether it ``has_cache``) before any field is used."""
    if len(blob) < 5 or blob[:4] != MAGIC:
        raise UserError("not a seedbed-compressed file (bad magic or too short)")
    if blob[4] != VERSION:
        raise UserError(f"compressed file has format version {blob[4]}; this seedbed reads version {VERSION} "
                        "(compress the file again, or it is damaged)")
    if len(blob) < HEADER.size:
        raise UserError(f"the compressed file is truncated ({len(blob)} bytes, "
                        f"shorter than its {HEADER.size}-byte header)")
    (_, _, file_mode, streams, digest, n_bytes, n_tokens, data_digest, payload_len, flags, reserved, every,
     mixer_iterations, reserved2, model_lr, crc) = HEADER.unpack_from(blob)
    if zlib.crc32(blob[:HEADER.size - 4]) != crc:
        raise UserError("the compressed file is corrupted (header checksum mismatch)")
    if digest != artifact_digest:
        raise UserError("the compressed file was made with a different artifact (checksum mismatch)")
    if flags & ~(FLAG_CACHE | FLAG_ADAPT) or reserved or reserved2:
        raise UserError("the compressed file is corrupted (unknown flags or reserved bytes set)")
    if flags & FLAG_CACHE and not has_cache:
        raise UserError("the compressed file was coded with an n-gram cache this artifact does not have")
    adapt = None
    if flags & FLAG_ADAPT:
        adapt = AdaptOptions(every, mixer_iterations, model_lr)
        try:
            adapt.check()
        except UserError:
            raise UserError("the compressed file is corrupted (adaptation options out of range)") from None
    elif every or mixer_iterations or model_lr:
        raise UserError("the compressed file is corrupted (adaptation options without adaptation)")
    if file_mode != mode:
        raise UserError(f"the compressed file's tokenizer mode {file_mode} does not match the artifact's ({mode})")
    if payload_len != len(blob) - HEADER.size:
        raise UserError(f"the compressed file is truncated or has trailing bytes "
                        f"({len(blob) - HEADER.size:,} payload bytes, header says {payload_len:,})")
    if payload_len % 4:
        raise UserError("the compressed file is corrupted (payload is not whole 32-bit words)")
    if n_tokens > (most := max_tokens(payload_len, vocab)):
        raise UserError(f"the compressed file is corrupted (it claims {n_tokens:,} tokens; "
                        f"its {payload_len:,}-byte payload holds at most {most:,})")
    if not 1 <= streams <= max(1, n_tokens):
        raise UserError(f"the compressed file is corrupted (it claims {streams} streams for {n_tokens:,} tokens)")
    # A byte token is one byte; other tokenizers give an empty text exactly when there are no tokens.
    if not (n_bytes == n_tokens if mode == 0 else (n_bytes == 0) == (n_tokens == 0)):
        raise UserError(f"the compressed file is corrupted (it claims {n_bytes:,} bytes in {n_tokens:,} tokens)")
    return HeaderFields(streams, n_bytes, n_tokens, data_digest, bool(flags & FLAG_CACHE), adapt)


def decompress_bytes(loaded, artifact_digest: bytes, blob: bytes, stride: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> tuple[bytes, CodecStats]:
    start = time.perf_counter()
    header = read_header(blob, artifact_digest, tokenizer_mode(loaded), loaded.model.cfg.vocab_size,
                         loaded.cache is not None)
    streams, n_bytes, n_tokens = header.streams, header.n_bytes, header.n_tokens
    words = np.frombuffer(blob[HEADER.size:], "<u4").astype(np.uint32)
    tokens = np.zeros(0, np.int64)
    if n_tokens:
        decoder = constriction.stream.queue.RangeDecoder(words)
        length = -(-n_tokens // streams)
        rows = np.zeros((streams, length), np.int64)
        scorer = scorer_for(loaded, streams, stride, header.use_cache, header.adapt, length)
        family = constriction.stream.model.Categorical(perfect=False)
        try:
            for p, real in code_positions(streams, length, n_tokens):
                freqs = integer_frequencies(scorer.next_probs())
                rows[real, p] = decoder.decode(family, freqs[real].astype(np.float64))
                scorer.feed(rows[:, p], real)
                if progress:
                    progress(p + 1, length)
        except (ValueError, RuntimeError, OverflowError, AssertionError):  # constriction asserts on invalid data
            raise UserError("the compressed file is corrupted or truncated (range decoding failed)") from None
        tokens = rows.reshape(-1)[:n_tokens]
    data = loaded.tokenizer.decode(tokens) if n_tokens else b""
    if len(data) != n_bytes or hashlib.sha256(data).digest() != header.data_digest:
        raise UserError("the compressed file is corrupted or truncated (decoded text fails its checksum)")
    return data, CodecStats(len(data), int(n_tokens), len(blob) - HEADER.size, time.perf_counter() - start)


def artifact_digest(path: str | Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()
