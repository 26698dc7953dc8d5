"""Token shards in the nanoGPT-speedrun / parameter-golf ``.bin`` format.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1,
token count, the rest zero) followed by the tokens as little-endian uint16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seedbed.errors import UserError

from seedbed.fileio import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = int(np.iinfo(np.int32).max)  # the count must fit header[2]
TOKENIZER_FILE = "tokenizer.model"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (1-D integers in [0, 65535]) as one shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not (tokens.size == 0 or np.issubdtype(tokens.dtype, np.integer)):
        raise UserError(
            f"cannot write shard {path}: tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}"
        )
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise UserError(f"cannot write shard {path}: token ids must lie in [0, 65535] to fit uint16")
    if tokens.size > MAX_SHARD_TOKENS:
        raise UserError(
            f"cannot write shard {path}: {tokens.size} tokens exceed {MAX_SHARD_TOKENS}; use smaller shards"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with atomic_write(Path(path)) as file:
        file.write(header.tobytes())
        file.write(tokens.astype("<u2").tobytes())


def read_shard(path: Path) -> np.ndarray:
    """The tokens of one shard as uint16, after checking its header against its size."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UserError(f"cannot read shard {path}: {error.strerror}") from None
    if size < HEADER_BYTES:
        raise UserError(f"shard {path} is truncated ({size} bytes, shorter than its header); re-export it")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise UserError(f"{path} is not a token shard (magic {header[0]}, expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard {path} has version {header[1]}; seedbed reads version {SHARD_VERSION}")
    token_count = int(header[2])
    expected_size = HEADER_BYTES + 2 * token_count
    if size != expected_size:
        problem = "is truncated" if size < expected_size else "has trailing bytes"
        raise UserError(
            f"shard {path} {problem}: header says {token_count} tokens ({expected_size} bytes), "
            f"file has {size} bytes; re-export it"
        )
    return np.fromfile(path, dtype="<u2", count=token_count, offset=HEADER_BYTES).astype(np.uint16, copy=False)


@dataclass
class ShardFiles:
    """The shard files of a folder, by split (sorted names); ``test`` may be empty."""

    train: list[Path]
    val: list[Path]
    test: list[Path]
    tokenizer_model: Path | None


def find_shard_files(directory: Path) -> ShardFiles:
    """Group ``*train*.bin``, ``*val*.bin`` and ``*test*.bin`` files of ``directory``."""
    if not directory.is_dir():
        raise UserError(f"shard folder {directory} does not exist; export one with export_shards or fix the path")
    by_split = {split: sorted(directory.glob(f"*{split}*.bin")) for split in ("train", "val", "test")}
    claimed = [path for paths in by_split.values() for path in paths]
    duplicates = sorted({path.name for path in claimed if claimed.count(path) > 1})
    if duplicates:
        raise UserError(f"shard files {duplicates} in {directory} match more than one of train/val/test; rename them")
    for split in ("train", "val"):
        if not by_split[split]:
            raise UserError(f"shard folder {directory} has no *{split}*.bin files; it needs train and val shards")
    model = directory / TOKENIZER_FILE
    return ShardFiles(by_split["train"], by_split["val"], by_split["test"], model if model.is_file() else None)


def read_shards(paths: list[Path]) -> np.ndarray:
    """The tokens of several shards, concatenated in the given order."""
    return np.concatenate([read_shard(path) for path in paths])
