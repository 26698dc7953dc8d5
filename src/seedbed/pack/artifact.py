"""The artifact: one self-describing file that reproduces a model, every byte accounted for.

Layout (little-endian)::

    0   magic  b"SEEDBED\\x1a"
    8   u16    format version
    10  u8     codec of the payload (0 raw, 1 zlib, 2 lzma, 3 zstd)
    11  u8     reserved, 0
    12  u64    payload length before compression
    20  u64    payload length after compression
    28  32 B   SHA-256 of the compressed payload
    60  ...    compressed payload

The payload is ``u32 manifest length | manifest JSON | blobs``. The manifest holds the
resolved config, where the tokenizer's bytes are, and for every tensor its name, storage
kind, shape, kind parameters and byte range. Nothing in an artifact is executed: JSON and
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
VERSION = 1
HEADER = struct.Struct("<8sHBBQQ32s")
SMALL_TENSOR = 65536  # tensors with fewer elements stay fp16 whatever the rule says

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


def group_name(name: str) -> str:
    """``blocks.3.mixer.q.weight`` -> ``blocks.*.mixer.q``: one row per kind of weight."""
    parts = [("*" if p.isdigit() else p) for p in name.split(".")]
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def build_payload(config: dict, state: dict[str, torch.Tensor], tokenizer_proto: bytes | None,
                  rule: QuantRule, extra: dict[str, Any] | None = None) -> bytes:
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
    manifest = {"config": config, "tensors": entries, **(extra or {}),
                "tokenizer": None if tokenizer_proto is None else {"offset": 0, "length": len(tokenizer_proto)}}
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(manifest_bytes)) + manifest_bytes + b"".join(blobs)


def encode_artifact(payload: bytes) -> bytes:
    """Compress with whichever codec gives the smallest file (measured, not assumed)."""
    best_id, best = min(((cid, codec[1](payload)) for cid, codec in CODECS.items()), key=lambda c: len(c[1]))
    header = HEADER.pack(MAGIC, VERSION, best_id, 0, len(payload), len(best), hashlib.sha256(best).digest())
    return header + best


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist")
    data = path.read_bytes()
    if len(data) < HEADER.size or data[:8] != MAGIC:
        raise UserError(f"{path} is not a seedbed artifact (bad magic or too short)")
    magic, version, codec_id, _, raw_len, packed_len, digest = HEADER.unpack_from(data)
    if version != VERSION:
        raise UserError(f"{path} has artifact format version {version}; this seedbed reads version {VERSION}")
    packed = data[HEADER.size:]
    if len(packed) != packed_len:
        raise UserError(f"artifact {path} is truncated or has trailing bytes ({len(packed)} of {packed_len} payload bytes)")
    if hashlib.sha256(packed).digest() != digest or codec_id not in CODECS:
        raise UserError(f"artifact {path} is corrupted (checksum mismatch)")
    payload = CODECS[codec_id][2](packed)
    if len(payload) != raw_len:
        raise UserError(f"artifact {path} is corrupted (payload length)")
    (manifest_len,) = struct.unpack_from("<I", payload)
    manifest = json.loads(payload[4:4 + manifest_len])
    blobs = memoryview(payload)[4 + manifest_len:]
    tokenizer = manifest["tokenizer"]
    proto = None if tokenizer is None else bytes(blobs[tokenizer["offset"]:tokenizer["offset"] + tokenizer["length"]])
    tensors = {}
    for entry in manifest["tensors"]:
        raw = bytes(blobs[entry["offset"]:entry["offset"] + entry["length"]])
        tensors[entry["name"]] = get_kind(entry["kind"]).decode(raw, entry["params"], tuple(entry["shape"]))
    return Artifact(manifest["config"], proto, tensors, manifest, len(data), raw_len, CODECS[codec_id][0])


def write_artifact(path: str | Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
