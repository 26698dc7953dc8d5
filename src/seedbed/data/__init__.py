"""Corpora, tokenizers and token shards for seedbed.

The trainer needs only ``load_dataset``; the rest is public for tools and tests.
"""

from .cache import cache_dir
from .corpus import Document, load_documents, load_splits, split_documents
from .dataset import Dataset, Split, export_shards, load_dataset
from .shards import read_shard, write_shard
from .tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
    tokenizer_from_proto,
)

__all__ = [
    "ByteTokenizer",
    "Dataset",
    "Document",
    "SentencePieceTokenizer",
    "Split",
    "Tokenizer",
    "cache_dir",
    "export_shards",
    "load_dataset",
    "load_documents",
    "load_splits",
    "make_tokenizer",
    "read_shard",
    "split_documents",
    "tokenizer_from_proto",
    "write_shard",
]
