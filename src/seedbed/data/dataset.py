"""Tokenized train/val/test splits: what the trainer consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seedbed.errors import UserError
from seedbed.fileio import atomic_write

from .cache import cache_dir
from .corpus import SPLIT_NAMES, Document, load_splits
from .modular import answer_tokens, describe, parse_modular
from .shards import TOKENIZER_FILE, find_shard_files, read_shards, write_shard
from .tokenizer import (
    TOKEN_DTYPE,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    decode_utf8,
    make_tokenizer,
)


@dataclass
class Split:
    tokens: np.ndarray  # 1-D uint16: the split's documents' token ids, concatenated in split order
    n_bytes: int  # bytes of text those tokens encode: the bits-per-byte denominator
    # modular:P data only: per token, the index of the equation whose answer it spells, -1 elsewhere
    # (what answer accuracy is counted on, see data/modular.py); None for other corpora.
    answers: np.ndarray | None = None


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    tokenizer: Tokenizer
    description: str  # one line for logs and reports


def load_dataset(spec: str = "default", tokenizer: str = "bytes", vocab_size: int = 1024) -> Dataset:
    """Load a corpus (see ``load_documents``, or ``shards:DIR``), split and tokenize it.

    Text corpora are tokenized one document at a time and concatenated, so
    ``n_bytes`` is exactly the split's text size. SentencePiece encodings are
    cached, keyed by the model and the split's content.
    """
    if spec.startswith("shards:"):
        folder = spec[len("shards:") :]
        if not folder:
            raise UserError("shards: needs a folder, e.g. shards:data/my_shards")
        return _load_shard_dataset(Path(folder).expanduser(), spec, tokenizer)
    modular = parse_modular(spec)
    if modular is not None and modular.form == "bytes" and tokenizer != "bytes":
        raise UserError(f"data {spec!r} writes numbers as single bytes, which are not UTF-8 text; "
                        f"train it with data.tokenizer=\"bytes\", not {tokenizer!r}")
    split_docs = load_splits(spec)
    docs = [doc for part in split_docs for doc in part]
    if tokenizer != "bytes":
        # SentencePiece reads UTF-8 only; say so before spending time on training.
        for doc in docs:
            decode_utf8(doc.data, doc.name)
    chosen = make_tokenizer(tokenizer, split_docs[0], vocab_size)
    train, val, test = (_encode_split(part, chosen) for part in split_docs)
    if modular is not None:
        for split in (train, val, test):
            split.answers = answer_tokens(chosen.byte_lengths(split.tokens), modular)
        return Dataset(train, val, test, chosen, f"{spec}: {describe(modular)}, tokenizer {chosen.label}")
    parts = " / ".join(
        f"{name} {_count(len(part), 'doc')} {_size(sum(len(doc.data) for doc in part))}"
        for name, part in zip(SPLIT_NAMES, split_docs, strict=True)
    )
    description = (
        f"{spec}: {_count(len(docs), 'doc')}, {_size(sum(len(doc.data) for doc in docs))} ({parts}), "
        f"tokenizer {chosen.label}"
    )
    return Dataset(train, val, test, chosen, description)


def _encode_split(docs: list[Document], tokenizer: Tokenizer) -> Split:
    n_bytes = sum(len(doc.data) for doc in docs)
    if isinstance(tokenizer, ByteTokenizer):  # cheaper to redo than to cache
        return Split(tokenizer.encode(b"".join(doc.data for doc in docs)), n_bytes)

    content = hashlib.sha256()
    for doc in docs:
        for part in (doc.name.encode(), doc.data):
            content.update(len(part).to_bytes(8, "little"))
            content.update(part)
    model_hash = hashlib.sha256(tokenizer.model_proto or b"").hexdigest()[:16]
    cached = cache_dir() / "tokens" / f"{tokenizer.name}-{model_hash}-{content.hexdigest()[:16]}.npy"
    if cached.is_file():
        return Split(np.load(cached, allow_pickle=False), n_bytes)
    tokens = np.concatenate([tokenizer.encode(doc.data) for doc in docs]).astype(TOKEN_DTYPE, copy=False)
    with atomic_write(cached) as file:
        np.save(file, tokens, allow_pickle=False)
    return Split(tokens, n_bytes)


def _load_shard_dataset(directory: Path, spec: str, tokenizer_spec: str) -> Dataset:
    """Splits from ``*train*.bin`` / ``*val*.bin`` / ``*test*.bin`` files (test = val when absent).

    The tokenizer is the folder's ``tokenizer.model`` when there is one (the
    shards were made with it), else an explicit ``sp:/path``, else bytes.
    """
    files = find_shard_files(directory)
    tokenizer = _shard_tokenizer(directory, files.tokenizer_model, tokenizer_spec)
    splits, parts = {}, []
    for name, paths in (("train", files.train), ("val", files.val), ("test", files.test)):
        if not paths:
            continue
        tokens = read_shards(paths)
        if tokens.size and tokens.max() >= tokenizer.vocab_size:
            raise UserError(
                f"shards in {directory} hold token id {tokens.max()}, beyond tokenizer {tokenizer.label}; "
                "pass the tokenizer they were made with (tokenizer=sp:/path/to/file.model)"
            )
        splits[name] = Split(tokens, tokenizer.count_bytes(tokens))
        parts.append(f"{name} {_count(len(paths), 'shard')} {_count(tokens.size, 'token')}")
    if not files.test:
        parts.append("no *test*.bin files: test = val")
    description = f"{spec}: {' / '.join(parts)}, tokenizer {tokenizer.label}"
    return Dataset(splits["train"], splits["val"], splits.get("test", splits["val"]), tokenizer, description)


def _shard_tokenizer(directory: Path, folder_model: Path | None, tokenizer_spec: str) -> Tokenizer:
    explicit = tokenizer_spec.startswith("sp:")
    if folder_model is not None:
        tokenizer = SentencePieceTokenizer.from_file(folder_model)
        if explicit and SentencePieceTokenizer.from_file(Path(tokenizer_spec[3:])).model_proto != tokenizer.model_proto:
            raise UserError(
                f"{tokenizer_spec} differs from {folder_model}, which made these shards; drop the tokenizer option"
            )
        return tokenizer
    if explicit:
        return SentencePieceTokenizer.from_file(Path(tokenizer_spec[3:]))
    if tokenizer_spec == "bytes":
        return ByteTokenizer()
    raise UserError(
        f"shard folder {directory} has no {TOKENIZER_FILE} and tokenizer {tokenizer_spec!r} cannot be trained from "
        "token ids; pass tokenizer=sp:/path/to/file.model, or tokenizer=bytes for byte-level shards"
    )


def export_shards(
    spec: str,
    out_dir: Path | str,
    tokenizer_spec: str = "bytes",
    vocab_size: int = 1024,
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Write a corpus's splits as ``train_000000.bin``..., ``val_...``, ``test_...`` shards.

    A SentencePiece model is saved next to them as ``tokenizer.model`` so that
    ``load_dataset("shards:DIR")`` finds it. Returns a summary of what was written.
    """
    if not 0 < shard_tokens <= 2**31 - 1:
        raise UserError(f"shard_tokens {shard_tokens} must be between 1 and {2**31 - 1}")
    out = Path(out_dir).expanduser()
    if out.is_dir() and (any(out.glob("*.bin")) or (out / TOKENIZER_FILE).exists()):
        # Old shards left beside new ones would silently join the corpus.
        raise UserError(f"{out} already holds shards; export into an empty folder or delete them first")
    dataset = load_dataset(spec, tokenizer_spec, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    if dataset.tokenizer.model_proto is not None:
        with atomic_write(out / TOKENIZER_FILE) as file:
            file.write(dataset.tokenizer.model_proto)
    summary: dict[str, Any] = {
        "out_dir": str(out),
        "description": dataset.description,
        "tokenizer": dataset.tokenizer.name,
        "vocab_size": dataset.tokenizer.vocab_size,
        "splits": {},
    }
    for name in SPLIT_NAMES:
        split: Split = getattr(dataset, name)
        paths = []
        for index, start in enumerate(range(0, max(split.tokens.size, 1), shard_tokens)):
            path = out / f"{name}_{index:06d}.bin"
            write_shard(path, split.tokens[start : start + shard_tokens])
            paths.append(path.name)
        summary["splits"][name] = {"files": paths, "tokens": int(split.tokens.size), "bytes": split.n_bytes}
    return summary


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _size(n_bytes: int) -> str:
    if n_bytes >= 1_000_000:
        return f"{n_bytes / 1e6:.2f} MB"
    if n_bytes >= 1_000:
        return f"{n_bytes / 1e3:.1f} kB"
    return f"{n_bytes} B"
