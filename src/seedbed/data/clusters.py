"""A corpus cut into clusters (c-BTM): chunks, and the ``cluster:I:FILE`` data spec.

``seedbed compose`` cuts every document of a corpus into chunks of about ``chunk_bytes``,
clusters the training chunks (``compose/cluster.py``) and writes which cluster every chunk
of every split belongs to: a training chunk by the balanced assignment, a held-out chunk
by its nearest centre. ``cluster:I:FILE`` is then the corpus of cluster I, every split of
it, and an expert trains on it like on any corpus.

A document is cut just after the newline nearest each multiple of ``chunk_bytes`` (within a
quarter chunk; at the mark itself, moved back to a UTF-8 character start, when there is
none). Chunk k of document ``name`` is ``name#k``.

The clusters file is JSON::

    {"format": "seedbed-clusters", "version": 1, "spec": <the clustered corpus>,
     "clusters": K, "chunk_bytes": n, "tokenizer": <tokenizer spec the features used>,
     "splits": {"train": [cluster of each chunk, in order], "val": [...], "test": [...]},
     "corpus": <sha256 of every split's chunk names and bytes>,
     "checksum": <sha256 of the canonical JSON of all the fields above>}

Every field is checked before use; a corpus that no longer matches the file (a changed
folder, another Python's standard library) is refused rather than silently re-clustered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from seedbed.errors import UserError
from seedbed.fileio import atomic_write_text

from .corpus import SPLIT_NAMES, Document, _cut_position

FORMAT, VERSION = "seedbed-clusters", 1
MAX_CLUSTERS = 256


def chunk_documents(docs: Sequence[Document], chunk_bytes: int) -> list[Document]:
    """Every document cut into chunks of about ``chunk_bytes`` (see the module docstring)."""
    if chunk_bytes <= 0:
        raise UserError(f"chunk size must be positive, got {chunk_bytes}")
    chunks = []
    for doc in docs:
        start, k = 0, 0
        while start < len(doc.data):
            mark = start + chunk_bytes
            end = len(doc.data) if mark >= len(doc.data) else max(start + 1, _cut_position(doc.data, mark, chunk_bytes // 4))
            chunks.append(Document(f"{doc.name}#{k}", doc.data[start:end]))
            start, k = end, k + 1
    return chunks


def corpus_digest(splits: Sequence[Sequence[Document]]) -> str:
    digest = hashlib.sha256()
    for split in splits:
        digest.update(len(split).to_bytes(8, "little"))
        for doc in split:
            for part in (doc.name.encode(), doc.data):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
    return digest.hexdigest()


def _checksum(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_clusters(path: str | Path, spec: str, clusters: int, chunk_bytes: int, tokenizer: str,
                   assignment: dict[str, list[int]], chunked: Sequence[Sequence[Document]]) -> None:
    """Write the clusters file (atomically); ``chunked`` are the (train, val, test) chunks assigned."""
    fields = {"format": FORMAT, "version": VERSION, "spec": spec, "clusters": clusters, "chunk_bytes": chunk_bytes,
              "tokenizer": tokenizer, "splits": {name: [int(c) for c in assignment[name]] for name in SPLIT_NAMES},
              "corpus": corpus_digest(chunked)}
    atomic_write_text(path, json.dumps({**fields, "checksum": _checksum(fields)}, sort_keys=True) + "\n")


def read_clusters(path: str | Path) -> dict:
    """The clusters file's fields, every one checked (not yet against the corpus: ``cluster_splits`` does)."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"clusters file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"clusters file {path} is not readable JSON ({error.__class__.__name__})") from None
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise UserError(f"{path} is not a seedbed clusters file")
    if fields.get("version") != VERSION:
        raise UserError(f"clusters file {path} has version {fields.get('version')!r}; this seedbed reads {VERSION}")
    checksum = fields.pop("checksum", None)
    if checksum != _checksum(fields):
        raise UserError(f"clusters file {path} is corrupted (checksum mismatch)")
    k, chunk_bytes, splits = fields.get("clusters"), fields.get("chunk_bytes"), fields.get("splits")
    if not (isinstance(k, int) and 1 <= k <= MAX_CLUSTERS and isinstance(chunk_bytes, int) and chunk_bytes > 0
            and isinstance(fields.get("spec"), str) and isinstance(fields.get("tokenizer"), str)
            and isinstance(splits, dict) and set(splits) == set(SPLIT_NAMES)
            and all(isinstance(c, int) and 0 <= c < k for name in SPLIT_NAMES for c in splits[name])):
        raise UserError(f"clusters file {path} is corrupted (a field is missing or out of range)")
    return fields


def parse_cluster_spec(spec: str) -> tuple[int, Path] | None:
    """``cluster:I:FILE`` -> (I, FILE); None for any other spec."""
    if not spec.startswith("cluster:"):
        return None
    index, _, file = spec[len("cluster:"):].partition(":")
    if not index.isdigit() or not file:
        raise UserError(f"data {spec!r}: write cluster:I:FILE, e.g. cluster:0:runs/cbtm/clusters.json")
    return int(index), Path(file)


def cluster_splits(spec: str, load_splits) -> tuple[list[Document], list[Document], list[Document]]:
    """The (train, val, test) chunks of one cluster of ``cluster:I:FILE``; ``load_splits`` loads the
    clustered corpus (passed in: it is ``corpus.load_splits``, which dispatches here)."""
    index, path = parse_cluster_spec(spec)
    fields = read_clusters(path)
    if index >= fields["clusters"]:
        raise UserError(f"data {spec!r}: {path} has clusters 0..{fields['clusters'] - 1}, not {index}")
    chunked = [chunk_documents(split, fields["chunk_bytes"]) for split in load_splits(fields["spec"])]
    if [len(split) for split in chunked] != [len(fields["splits"][name]) for name in SPLIT_NAMES] or \
            corpus_digest(chunked) != fields["corpus"]:
        raise UserError(f"corpus {fields['spec']!r} has changed since {path} was written; cluster it again")
    chosen = tuple([chunk for chunk, c in zip(split, fields["splits"][name], strict=True) if c == index]
                   for split, name in zip(chunked, SPLIT_NAMES, strict=True))
    for name, split in zip(SPLIT_NAMES, chosen, strict=True):
        if not split:
            raise UserError(f"cluster {index} of {path} has no {name} chunks; use fewer clusters or a bigger corpus")
    return chosen
