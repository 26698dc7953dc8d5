"""Linears whose weights grow from 64-bit seeds (GERMINATOR) or rest on seeded bases (golf).

``seeded`` (GERMINATOR)::

    W = coarse[:, None] * sign * prune / sqrt(keep) * (base * (1 + fine_scale) + fine_shift)
    base = 3 / sqrt(rank) * (A @ B),  A, B = int8 / 128 (or uint8 / 256 - 1/2) low-rank factors

Every tensor on the right but ``coarse`` is generated from its own seed: the low-rank
factors, the fine-grained scale and shift (uint8 / 256 - 1/2 and int8 / 128, times an
amplitude), the prune supermask (keeping a fraction) and the sign-switching supermask.
Only ``coarse`` (one float32 per output row) is learned by gradient; the seeds are
int64 buffers, stored in 8 bytes each, changed only by a seed search.

``orthogonal-lora`` (golf document) and ``gaussian-lora``::

    W = gain[:, None] * Q + B_lora @ A_lora

Q is frozen: the Q factor of a seeded normal matrix with the signs of R's diagonal
fixed positive (unique), or for the Gaussian variant the scaled normal matrix itself.

Generated matrices are cached and rebuilt only when a seed changes (also after loading a
checkpoint): the cost per step is one elementwise product beside the matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.registry import LINEARS, require
from seedbed.seeds import random_int8, random_mask, random_normal, random_uint8

SEED_RANGE = (-(2**63), 2**63 - 1)


def fresh_seeds(count: int) -> torch.Tensor:
    """Seeds drawn from torch's global generator, so a model seeded by train.seed is reproducible."""
    return torch.randint(*SEED_RANGE, (count,), dtype=torch.int64)


class SeedCache(nn.Module):
    """Holds the int64 seed buffer and rebuilds a generated matrix when the seeds change."""

    def __init__(self, n_seeds: int):
        super().__init__()
        self.register_buffer("seeds", fresh_seeds(n_seeds))
        self._key: tuple[int, ...] | None = None
        self._matrix: torch.Tensor | None = None

    def generated(self, build) -> torch.Tensor:
        key = tuple(self.seeds.tolist())
        if key != self._key or self._matrix is None or self._matrix.device != self.seeds.device:
            with torch.no_grad():
                self._matrix = build(key).to(self.seeds.device)
            self._key = key
        return self._matrix


@LINEARS.register("seeded")
class SeededLinear(SeedCache):
    SEED_NAMES = ("factor_a", "factor_b", "fine_scale", "fine_shift", "prune", "sign")

    @dataclass
    class Options:
        rank: int = 16
        factors: str = "int8"  # int8 (v / 128) | uint8 (v / 256, recentred)
        fine_scale: float = 0.5  # amplitude of the seeded elementwise scale; 0 disables
        fine_shift: float = 0.1  # amplitude of the seeded elementwise shift; 0 disables
        keep: float = 1.0  # prune supermask: fraction of weights kept
        sign_mask: bool = True  # sign-switching supermask

        def check(self, where: str) -> None:
            require(self.rank > 0, f"{where}.rank must be positive")
            require(self.factors in ("int8", "uint8"), f"{where}.factors must be int8 or uint8")
            require(0 < self.keep <= 1, f"{where}.keep must be in (0, 1]")
            require(self.fine_scale >= 0 and self.fine_shift >= 0, f"{where}.fine_scale and fine_shift must be >= 0")

    def __init__(self, in_features: int, out_features: int, options: Options, zero_init: bool = False):
        super().__init__(len(self.SEED_NAMES))
        self.in_features, self.out_features, self.options = in_features, out_features, options
        self.rank = min(options.rank, in_features, out_features)
        init = 0.0 if zero_init else 1.0 / math.sqrt(in_features)
        self.coarse = nn.Parameter(torch.full((out_features,), init))

    def build(self, seeds: tuple[int, ...]) -> torch.Tensor:
        o = self.options
        s = dict(zip(self.SEED_NAMES, seeds))
        shape_a, shape_b = (self.out_features, self.rank), (self.rank, self.in_features)
        if o.factors == "int8":
            a = random_int8(s["factor_a"], shape_a).float() / 128
            b = random_int8(s["factor_b"], shape_b).float() / 128
        else:
            a = random_uint8(s["factor_a"], shape_a).float() / 256 - 0.5
            b = random_uint8(s["factor_b"], shape_b).float() / 256 - 0.5
        # Entries of a and b have variance ~1/3 (int8) or ~1/12 (uint8); normalise the product to unit variance.
        variance = (1 / 3) ** 2 if o.factors == "int8" else (1 / 12) ** 2
        matrix = (a @ b) / math.sqrt(self.rank * variance)
        shape = (self.out_features, self.in_features)
        if o.fine_scale:
            matrix = matrix * (1 + o.fine_scale * (random_uint8(s["fine_scale"], shape).float() / 256 - 0.5) * 2)
        if o.fine_shift:
            matrix = matrix + o.fine_shift * random_int8(s["fine_shift"], shape).float() / 128
        if o.keep < 1:
            matrix = matrix * random_mask(s["prune"], shape, o.keep) / math.sqrt(o.keep)
        if o.sign_mask:
            matrix = torch.where(random_mask(s["sign"], shape, 0.5), -matrix, matrix)
        return matrix

    @property
    def virtual_numel(self) -> int:
        return self.in_features * self.out_features

    def weight(self) -> torch.Tensor:
        return self.coarse[:, None] * self.generated(self.build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class LoRABase(SeedCache):
    """Frozen seeded basis times a learnable row gain, plus a trainable low-rank adapter."""

    @dataclass
    class Options:
        rank: int = 64

        def check(self, where: str) -> None:
            require(self.rank > 0, f"{where}.rank must be positive")

    def __init__(self, in_features: int, out_features: int, options: Options, zero_init: bool = False):
        super().__init__(1)
        self.in_features, self.out_features = in_features, out_features
        rank = min(options.rank, in_features, out_features)
        self.gain = nn.Parameter(torch.full((out_features,), 0.0 if zero_init else 1.0))
        self.lora_a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    @property
    def virtual_numel(self) -> int:
        return self.in_features * self.out_features + self.lora_a.numel() + self.lora_b.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.gain[:, None] * self.generated(self.build) + self.lora_b @ self.lora_a
        return F.linear(x, weight.to(x.dtype))


@LINEARS.register("orthogonal-lora")
class OrthogonalLoRALinear(LoRABase):
    def build(self, seeds: tuple[int, ...]) -> torch.Tensor:
        rows, cols = max(self.out_features, self.in_features), min(self.out_features, self.in_features)
        q, r = torch.linalg.qr(random_normal(seeds[0], (rows, cols)).double())
        q = q * torch.sign(torch.diagonal(r))[None, :]  # fix the signs: the factorisation becomes unique
        q = q if self.out_features >= self.in_features else q.T
        # Orthonormal rows (or columns) have entries of variance 1/max(out, in); match a 1/sqrt(in) init.
        return (q * math.sqrt(rows / self.in_features)).float()


@LINEARS.register("gaussian-lora")
class GaussianLoRALinear(LoRABase):
    def build(self, seeds: tuple[int, ...]) -> torch.Tensor:
        return random_normal(seeds[0], (self.out_features, self.in_features)) / math.sqrt(self.in_features)
