"""Storage kinds: how one tensor is written into an artifact and read back.

Each kind turns a float tensor into bytes plus a small JSON-able ``params`` dict, and
back. The artifact reader looks kinds up by the name stored beside each tensor, so a
new kind (seed-generated weights, say) registers here and the format never changes.

Quantised kinds keep float16 scales: ``int8`` one per row, ``int6``/``int4`` one per
group of ``group`` consecutive values in a row, ``ternary`` one per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from seedbed.errors import UserError
from seedbed.model.bitlinear import ternarise


@dataclass(frozen=True)
class StorageKind:
    name: str
    encode: Callable[[torch.Tensor, dict], tuple[bytes, dict]]
    decode: Callable[[bytes, dict, tuple[int, ...]], torch.Tensor]
    lossless: bool


KINDS: dict[str, StorageKind] = {}


def register_kind(name: str, encode, decode, lossless: bool = False) -> None:
    if name in KINDS:
        raise ValueError(f"storage kind {name!r} registered twice")
    KINDS[name] = StorageKind(name, encode, decode, lossless)


def get_kind(name: str) -> StorageKind:
    if name not in KINDS:
        raise UserError(f"unknown storage kind {name!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[name]


# -- plain floats ------------------------------------------------------------------------
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def float_kind(name: str, dtype: torch.dtype) -> None:
    def encode(t: torch.Tensor, options: dict) -> tuple[bytes, dict]:
        return t.detach().to(dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes(), {}

    def decode(data: bytes, params: dict, shape: tuple[int, ...]) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw.view(dtype).reshape(shape).float()

    register_kind(name, encode, decode, lossless=dtype == torch.float32)


for _name, _dtype in FLOAT_DTYPES.items():
    float_kind(_name, _dtype)


# -- integer packing helpers ---------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers < 2**bits, little-endian within each byte group."""
    values = values.astype(np.uint32).ravel()
    per_group = {2: 4, 4: 2, 6: 4}[bits]  # values per byte group: 4x2 bits, 2x4 bits, 4x6 bits = 3 bytes
    pad = (-len(values)) % per_group
    v = np.concatenate([values, np.zeros(pad, np.uint32)]).reshape(-1, per_group)
    word = np.zeros(len(v), np.uint32)
    for i in range(per_group):
        word |= v[:, i] << (bits * i)
    n_bytes = bits * per_group // 8
    return word.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :n_bytes].tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    per_group = {2: 4, 4: 2, 6: 4}[bits]
    n_bytes = bits * per_group // 8
    raw = np.frombuffer(data, np.uint8).reshape(-1, n_bytes)
    word = np.zeros(len(raw), np.uint32)
    for i in range(n_bytes):
        word |= raw[:, i].astype(np.uint32) << (8 * i)
    out = np.stack([(word >> (bits * i)) & ((1 << bits) - 1) for i in range(per_group)], axis=1)
    return out.ravel()[:count]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as a matrix of rows (1-D tensors are one row)."""
    return t.detach().float().reshape(t.shape[0] if t.ndim > 1 else 1, -1)


def clip_scale(rows: torch.Tensor, levels: int, percentile: float) -> torch.Tensor:
    """Per-row scale mapping the ``percentile`` of |w| to the largest level."""
    if percentile >= 100:
        top = rows.abs().amax(dim=1)
    else:
        top = torch.quantile(rows.abs(), percentile / 100, dim=1)
    return (top / levels).clamp_min(1e-12).to(torch.float16).float()


# -- int8 per row --------------------------------------------------------------------------
def encode_int8(t: torch.Tensor, options: dict) -> tuple[bytes, dict]:
    rows = as_rows(t)
    scale = clip_scale(rows, 127, options.get("clip_percentile", 100.0))
    q = torch.clamp(torch.round(rows / scale[:, None]), -127, 127).to(torch.int8)
    return scale.to(torch.float16).numpy().tobytes() + q.numpy().tobytes(), {}


def decode_int8(data: bytes, params: dict, shape: tuple[int, ...]) -> torch.Tensor:
    n_rows = shape[0] if len(shape) > 1 else 1
    scale = torch.from_numpy(np.frombuffer(data[:2 * n_rows], np.float16).astype(np.float32))
    q = torch.from_numpy(np.frombuffer(data[2 * n_rows:], np.int8).astype(np.float32)).reshape(n_rows, -1)
    return (q * scale[:, None]).reshape(shape)


register_kind("int8", encode_int8, decode_int8)


# -- int6 / int4 group-wise ------------------------------------------------------------------
def grouped_kind(name: str, bits: int) -> None:
    levels = 2 ** (bits - 1) - 1  # symmetric: int4 -> [-7, 7], int6 -> [-31, 31]

    def encode(t: torch.Tensor, options: dict) -> tuple[bytes, dict]:
        group = int(options.get("group", 64))
        flat = t.detach().float().reshape(-1)
        pad = (-flat.numel()) % group
        groups = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, group)
        scale = clip_scale(groups, levels, options.get("clip_percentile", 100.0))
        q = torch.clamp(torch.round(groups / scale[:, None]), -levels, levels).to(torch.int32) + levels
        packed = pack_bits(q.reshape(-1)[:flat.numel()].numpy(), bits)
        return scale.to(torch.float16).numpy().tobytes() + packed, {"group": group}

    def decode(data: bytes, params: dict, shape: tuple[int, ...]) -> torch.Tensor:
        group, count = params["group"], int(np.prod(shape))
        n_groups = -(-count // group)
        scale = np.frombuffer(data[:2 * n_groups], np.float16).astype(np.float32)
        q = unpack_bits(data[2 * n_groups:], bits, count).astype(np.float32) - levels
        q = np.concatenate([q, np.zeros(n_groups * group - count, np.float32)]).reshape(n_groups, group)
        return torch.from_numpy((q * scale[:, None]).reshape(-1)[:count].copy()).reshape(shape)

    register_kind(name, encode, decode)


grouped_kind("int6", 6)
grouped_kind("int4", 4)


# -- ternary {-1, 0, 1} x one scale -------------------------------------------------------------
def encode_ternary(t: torch.Tensor, options: dict) -> tuple[bytes, dict]:
    """BitNet b1.58 absmean, by BitLinear's own quantiser (so both pick the same trits): scale = mean |w|,
    trits = round(w / scale) clipped to [-1, 1]; a tensor already on a ternary grid (a weight decoded
    from an artifact) stores its own signs and magnitude, so re-packing writes the same bytes."""
    trits, scale = ternarise(t.detach().float())
    trits = trits.to(torch.int32).reshape(-1) + 1
    digits = trits.numpy().astype(np.uint32)
    pad = (-len(digits)) % 5
    digits = np.concatenate([digits, np.zeros(pad, np.uint32)]).reshape(-1, 5)
    # 5 trits per byte: 3^5 = 243 <= 256, i.e. 1.6 bits per weight.
    packed = (digits * np.array([1, 3, 9, 27, 81], np.uint32)).sum(axis=1).astype(np.uint8)
    return np.float32(scale.item()).tobytes() + packed.tobytes(), {}


def decode_ternary(data: bytes, params: dict, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    scale = np.frombuffer(data[:4], np.float32)[0]
    packed = np.frombuffer(data[4:], np.uint8).astype(np.uint32)
    digits = np.stack([(packed // p) % 3 for p in (1, 3, 9, 27, 81)], axis=1).ravel()[:count]
    return torch.from_numpy((digits.astype(np.float32) - 1) * scale).reshape(shape)


register_kind("ternary", encode_ternary, decode_ternary)


# -- raw bytes of any dtype (integer buffers such as seeds) -------------------------------------
def encode_raw(t: torch.Tensor, options: dict) -> tuple[bytes, dict]:
    dtype = str(t.dtype).removeprefix("torch.")
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(), {"dtype": dtype}


def decode_raw(data: bytes, params: dict, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = getattr(torch, params["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"artifact tensor has unknown dtype {params['dtype']!r}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


register_kind("raw", encode_raw, decode_raw, lossless=True)
