"""A counter-based PRNG in integer tensor ops: the same seed gives the same bits anywhere.

Element ``i`` of the stream for a 64-bit ``seed`` is a 32-bit hash of (seed, i), so any
slice of a generated tensor can be produced independently, in any order, on any device.
All arithmetic is on int64 tensors holding values below 2**32, and every product is
split into 16-bit halves so that no intermediate exceeds 2**63: no overflow, no
platform-dependent wrap-around, and bit-identical results on CPU and CUDA in any
PyTorch version. The mixing function is Wellons' "lowbias32" integer hash.

Derived distributions stay exact where it matters: int8 and uint8 are the top 8 bits;
the approximate normal is an Irwin–Hall sum of four 16-bit uniforms, an integer sum
divided by a power of two, so it too is bit-identical across devices.
"""

from __future__ import annotations

import hashlib

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
CPU_BLOCK = 1 << 16


def seed_from_name(base: int, name: str) -> int:
    """A 64-bit seed for a named tensor, derived from a base seed (stable across runs)."""
    digest = hashlib.sha256(f"{base}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, computed in 16-bit halves of c to stay below 2**63."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: int, count: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """int64 tensor of ``count`` 32-bit values: element i is hash(seed, offset + i)."""
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed {seed} does not fit in 64 bits")
    unsigned = seed & 0xFFFFFFFFFFFFFFFF
    seed_low, seed_high = unsigned & MASK32, unsigned >> 32
    out = torch.empty(count, dtype=torch.int64, device=device)
    # ~50 elementwise passes per element: on the CPU, blocks that stay in cache run several
    # times faster than one pass over a large tensor (elements are independent, so the bits
    # do not depend on the block size).
    block = CPU_BLOCK if out.device.type == "cpu" else max(count, 1)
    for start in range(0, count, block):
        index = torch.arange(offset + start, offset + min(start + block, count), dtype=torch.int64, device=device)
        # The index may exceed 32 bits for huge virtual tensors: fold its high half in too.
        x = lowbias32((index & MASK32) ^ seed_low)
        x = lowbias32(x ^ seed_high ^ ((index >> 32) * GOLDEN & MASK32))
        out[start:start + len(index)] = lowbias32((x + GOLDEN) & MASK32)
    return out


def random_int8(seed: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """Signed bytes in [-128, 127] (the top 8 bits of each hash)."""
    count = int(torch.tensor(shape).prod()) if shape else 1
    return ((random_bits(seed, count, device) >> 24) - 128).to(torch.int8).reshape(shape)


def random_uint8(seed: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    count = int(torch.tensor(shape).prod()) if shape else 1
    return (random_bits(seed, count, device) >> 24).to(torch.uint8).reshape(shape)


def random_uniform(seed: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """float32 in [0, 1) with 24 random bits (exactly representable)."""
    count = int(torch.tensor(shape).prod()) if shape else 1
    return ((random_bits(seed, count, device) >> 8).to(torch.float32) / 2**24).reshape(shape)


def random_normal(seed: int, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """Approximately standard normal: Irwin–Hall sum of four 16-bit uniforms, recentred, unit variance."""
    count = int(torch.tensor(shape).prod()) if shape else 1
    bits = random_bits(seed, 2 * count, device).reshape(count, 2)
    total = (bits[:, 0] & 0xFFFF) + (bits[:, 0] >> 16) + (bits[:, 1] & 0xFFFF) + (bits[:, 1] >> 16)
    # Sum of 4 uniforms on [0, 2^16): mean 2 * 2^16, variance 4 * (2^32 - 1) / 12.
    centred = (total - 2 * 65535).to(torch.float64) / 2**16
    return (centred * (3.0**0.5)).to(torch.float32).reshape(shape)


def random_mask(seed: int, shape: tuple[int, ...], keep: float, device="cpu") -> torch.Tensor:
    """Boolean mask keeping each element with probability ``keep`` (an exact threshold on 32 bits)."""
    count = int(torch.tensor(shape).prod()) if shape else 1
    threshold = int(round(keep * 2**32))
    return (random_bits(seed, count, device) < threshold).reshape(shape)
