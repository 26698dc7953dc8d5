"""The artifact: one self-describing file that reproduces a model, every byte accounted for.

Layout (little-endian), format version 2::

    0   8 B    magic b"SEEDBED\\x1a"
    8   u16    format version (2)
    10  u8     codec of the payload: 0 raw, 1 zlib, 2 lzma, 3 zstd
    11  u8     reserved, 0
    12  u64    payload length before compression (= the compressed length for raw)
    20  u64    payload length after compression (= file size - 64)
    28  32 B   SHA-256 of the compressed payload
    60  u32    CRC32 of header bytes 0-59
    64  ...    compressed payload

A reader checks the magic and the version first (they say what the rest is), then the
header's CRC32, then every field against the file before using it, then the payload's
SHA-256, and only then decompresses. The uncompressed length is compared with what the
codec produces, never used to size a buffer.

The payload is ``u32 manifest length | manifest JSON | blobs``. The manifest holds the
resolved config, where the tokenizer's bytes are, for every tensor its name, storage
kind, shape, kind parameters and byte range, and where the n-gram cache's bytes are
(``cachemix.TextCache.to_bytes``, checked by its own CRC32), if the model has one. Nothing in an artifact is executed: JSON and
raw bytes only, decoded by the storage kinds in ``seedbed.pack.kinds``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard

from seedbed.errors import UserError
from seedbed.fileio import atomic_write_bytes
from seedbed.pack.kinds import get_kind

MAGIC = b"SEEDBED\x1a"
VERSION = 2
HEADER = struct.Struct("<8sHBBQQ32sI")  # the fields above, then the CRC32 of the bytes before it
SMALL_TENSOR = 65536  # tensors with fewer elements stay fp16 whatever the rule says

# id -> (name, compress, decompress); ids are stored in artifacts, so never reuse one.
CODECS = {
    0: ("raw", lambda b: b, lambda b: b),
    1: ("zlib", lambda b: zlib.compress(b, 9), zlib.decompress),
    2: ("lzma", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    3: ("zstd", lambda b: zstandard.ZstdCompressor(level=22).compress(b),
        lambda b: zstandard.ZstdDecompressor().decompress(b)),
}


@dataclass
class QuantRule:
    """Which storage kind each tensor gets: explicit ``pattern=kind`` items first, then the kinds
    modules declare for their own tensors (``declared``, e.g. BitLinear's ternary weights), then
    the default by dtype and size."""

    default: str = "int8"
    patterns: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)  # exact tensor name -> kind

    @classmethod
    def parse(cls, spec: str, clip_percentile: float = 100.0, group: int = 64) -> "QuantRule":
        rule = cls(options={"clip_percentile": clip_percentile, "group": group})
        for item in filter(None, (part.strip() for part in spec.split(","))):
            if "=" in item:
                pattern, kind = item.split("=", 1)
                get_kind(kind)
                rule.patterns.append((pattern, kind))
            else:
                get_kind(item)
                rule.default = item
        if not 0 < clip_percentile <= 100:
            raise UserError(f"clip percentile must be in (0, 100], got {clip_percentile}")
        if group <= 0:
            raise UserError(f"quantisation group must be positive, got {group}")
        return rule

    def kind_for(self, name: str, tensor: torch.Tensor) -> str:
        for pattern, kind in self.patterns:
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        if name in self.declared:
            return self.declared[name]
        if not tensor.is_floating_point():
            return "raw"
        if tensor.ndim < 2 or tensor.numel() < SMALL_TENSOR:
            return "fp16" if self.default not in ("fp32", "bf16") else self.default
        return self.default


@dataclass
class Artifact:
    config: dict[str, Any]
    tokenizer_proto: bytes | None
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    file_size: int
    payload_size: int
    codec: str
    cache: bytes | None = None  # the n-gram cache and its gate (cachemix.TextCache.to_bytes)


def group_name(name: str) -> str:
    """``blocks.3.mixer.q.weight`` -> ``blocks.*.mixer.q``: one row per kind of weight."""
    parts = [("*" if p.isdigit() else p) for p in name.split(".")]
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def build_payload(config: dict, state: dict[str, torch.Tensor], tokenizer_proto: bytes | None,
                  rule: QuantRule, extra: dict[str, Any] | None = None, cache: bytes | None = None) -> bytes:
    blobs, entries, offset = [], [], 0
    if tokenizer_proto is not None:
        blobs.append(tokenizer_proto)
        offset += len(tokenizer_proto)
    for name, tensor in state.items():
        kind = rule.kind_for(name, tensor)
        data, params = get_kind(kind).encode(tensor, rule.options)
        entries.append({"name": name, "kind": kind, "shape": list(tensor.shape), "params": params,
                        "offset": offset, "length": len(data)})
        blobs.append(data)
        offset += len(data)
    cache_entry = None
    if cache is not None:
        cache_entry = {"offset": offset, "length": len(cache)}
        blobs.append(cache)
    manifest = {"config": config, "tensors": entries, **(extra or {}), "cache": cache_entry,
                "tokenizer": None if tokenizer_proto is None else {"offset": 0, "length": len(tokenizer_proto)}}
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(manifest_bytes)) + manifest_bytes + b"".join(blobs)


def seal(header: bytes) -> bytes:
    """``header`` with its last four bytes set to the CRC32 of all the others."""
    return header[:-4] + struct.pack("<I", zlib.crc32(header[:-4]))


def encode_artifact(payload: bytes) -> bytes:
    """Compress with whichever codec gives the smallest file (measured, not assumed)."""
    best_id, best = min(((cid, codec[1](payload)) for cid, codec in CODECS.items()), key=lambda c: len(c[1]))
    header = HEADER.pack(MAGIC, VERSION, best_id, 0, len(payload), len(best), hashlib.sha256(best).digest(), 0)
    return seal(header) + best


def check_header(path: Path, data: bytes) -> tuple[int, int]:
    """(codec id, uncompressed length) from an artifact's header, every field checked against the file."""
    if len(data) < 10 or data[:8] != MAGIC:
        raise UserError(f"{path} is not a seedbed artifact (bad magic or too short)")
    (version,) = struct.unpack_from("<H", data, 8)
    if version != VERSION:
        raise UserError(f"{path} has artifact format version {version}; this seedbed reads version {VERSION} "
                        "(pack the run again, or the file is damaged)")
    if len(data) < HEADER.size:
        raise UserError(f"artifact {path} is truncated ({len(data)} bytes, shorter than its {HEADER.size}-byte header)")
    _, _, codec_id, reserved, raw_len, packed_len, digest, crc = HEADER.unpack_from(data)
    if zlib.crc32(data[:HEADER.size - 4]) != crc:
        raise UserError(f"artifact {path} is corrupted (header checksum mismatch)")
    if codec_id not in CODECS:
        raise UserError(f"artifact {path} is corrupted (unknown payload codec {codec_id})")
    if reserved != 0:
        raise UserError(f"artifact {path} is corrupted (reserved header byte is {reserved}, not 0)")
    if packed_len != len(data) - HEADER.size:
        raise UserError(f"artifact {path} is truncated or has trailing bytes "
                        f"({len(data) - HEADER.size:,} payload bytes, header says {packed_len:,})")
    if CODECS[codec_id][0] == "raw" and raw_len != packed_len:
        raise UserError(f"artifact {path} is corrupted (uncompressed payload of {raw_len:,} bytes "
                        f"stored raw in {packed_len:,})")
    if hashlib.sha256(data[HEADER.size:]).digest() != digest:
        raise UserError(f"artifact {path} is corrupted (payload checksum mismatch)")
    return codec_id, raw_len


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist")
    data = path.read_bytes()
    codec_id, raw_len = check_header(path, data)
    try:
        payload = CODECS[codec_id][2](data[HEADER.size:])
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError):
        payload = None  # the checksums match, so the codec id is wrong for these bytes
    if payload is None or len(payload) != raw_len:
        raise UserError(f"artifact {path} is corrupted (payload does not decompress to {raw_len:,} bytes)")
    manifest_len = int.from_bytes(payload[:4], "little")
    if len(payload) < 4 or 4 + manifest_len > len(payload):
        raise UserError(f"artifact {path} is corrupted (manifest longer than the payload)")
    manifest = json.loads(payload[4:4 + manifest_len])
    blobs = memoryview(payload)[4 + manifest_len:]
    tokenizer = manifest["tokenizer"]
    proto = None if tokenizer is None else bytes(blobs[tokenizer["offset"]:tokenizer["offset"] + tokenizer["length"]])
    tensors = {}
    for entry in manifest["tensors"]:
        raw = bytes(blobs[entry["offset"]:entry["offset"] + entry["length"]])
        tensors[entry["name"]] = get_kind(entry["kind"]).decode(raw, entry["params"], tuple(entry["shape"]))
    cache = None
    if manifest.get("cache") is not None:
        offset, length = manifest["cache"]["offset"], manifest["cache"]["length"]
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset <= offset + length <= len(blobs)):
            raise UserError(f"artifact {path} is corrupted (n-gram cache section out of bounds)")
        cache = bytes(blobs[offset:offset + length])
    return Artifact(manifest["config"], proto, tensors, manifest, len(data), raw_len, CODECS[codec_id][0], cache)


def write_artifact(path: str | Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
