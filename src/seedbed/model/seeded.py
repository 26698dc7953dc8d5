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

When ``seeded`` has no elementwise piece (fine_scale = fine_shift = 0, keep = 1, no sign
mask) the weight is the low-rank product itself, and it is never materialised:
``y = coarse * ((x B^T) A^T)``, with ``weight()`` beside it as the plain reference.

Layer streaming (``model.stream_layers``): nothing is cached; each use regenerates its
tensors and drops them, and the model checkpoints every block so that backward
regenerates them too. Every generated tensor is entered in ``GENERATED`` (weak
references) so tests and benchmarks can count what is alive.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.perf import Flops, matmul_flops
from seedbed.registry import LINEARS, require
from seedbed.seeds import random_int8, random_mask, random_normal, random_uint8

SEED_RANGE = (-(2**63), 2**63 - 1)

# Every generated tensor still alive anywhere (weak references: entering one keeps nothing alive).
GENERATED: weakref.WeakSet = weakref.WeakSet()


def fresh_seeds(count: int) -> torch.Tensor:
    """Seeds drawn from torch's global generator, so a model seeded by train.seed is reproducible."""
    return torch.randint(*SEED_RANGE, (count,), dtype=torch.int64)


class SeedCache(nn.Module):
    """Holds the int64 seed buffer and rebuilds generated tensors when the seeds change.

    ``build(seeds)`` returns a tensor or a tuple of tensors. With ``streaming`` set, every
    call builds afresh and nothing is kept.
    """

    def __init__(self, n_seeds: int):
        super().__init__()
        self.register_buffer("seeds", fresh_seeds(n_seeds))
        self.streaming = False
        self._key: tuple[str, tuple[int, ...]] | None = None
        self._built = None

    def _build(self, build, key: tuple[int, ...]):
        with torch.no_grad():
            built = build(key)
            tensors = built if isinstance(built, tuple) else (built,)
            tensors = tuple(t.to(self.seeds.device) for t in tensors)
        for t in tensors:
            GENERATED.add(t)
        return tensors if isinstance(built, tuple) else tensors[0]

    def generated(self, build):
        seeds = tuple(self.seeds.tolist())
        if self.streaming:
            self._key = self._built = None
            return self._build(build, seeds)
        key = (build.__name__, seeds)  # one module may build different things (factors, full matrix)
        if key != self._key or self._built is None or self._built_device() != self.seeds.device:
            self._built = self._build(build, seeds)
            self._key = key
        return self._built

    def _built_device(self) -> torch.device:
        first = self._built[0] if isinstance(self._built, tuple) else self._built
        return first.device


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
        coarse: str = "row"  # learnable float32 scale: one per output row, or one per matrix ("scalar")

        def check(self, where: str) -> None:
            require(self.rank > 0, f"{where}.rank must be positive")
            require(self.factors in ("int8", "uint8"), f"{where}.factors must be int8 or uint8")
            require(0 < self.keep <= 1, f"{where}.keep must be in (0, 1]")
            require(self.fine_scale >= 0 and self.fine_shift >= 0, f"{where}.fine_scale and fine_shift must be >= 0")
            require(self.coarse in ("row", "scalar"), f"{where}.coarse must be row or scalar, got {self.coarse!r}")

    def __init__(self, in_features: int, out_features: int, options: Options, zero_init: bool = False):
        super().__init__(len(self.SEED_NAMES))
        self.in_features, self.out_features, self.options = in_features, out_features, options
        self.rank = min(options.rank, in_features, out_features)
        init = 0.0 if zero_init else 1.0 / math.sqrt(in_features)
        self.coarse = nn.Parameter(torch.full((out_features if options.coarse == "row" else 1,), init))
        self.factored = not (options.fine_scale or options.fine_shift or options.keep < 1 or options.sign_mask)

    def build_factors(self, seeds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (out, rank) and B (rank, in) whose product has unit-variance entries."""
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
        return a / math.sqrt(self.rank * variance), b

    def build(self, seeds: tuple[int, ...]) -> torch.Tensor:
        o = self.options
        s = dict(zip(self.SEED_NAMES, seeds))
        a, b = self.build_factors(seeds)
        matrix = a @ b
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

    @property
    def matmul_macs(self) -> int:
        """Multiply-adds per token: the factored path never forms the full matrix."""
        if self.factored:
            return self.rank * (self.in_features + self.out_features)
        return self.in_features * self.out_features

    def weight(self) -> torch.Tensor:
        """The materialised weight; the plain reference for the factored path too."""
        return self.coarse[:, None] * self.generated(self.build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored:
            a, b = self.generated(self.build_factors)
            return F.linear(F.linear(x, b.to(x.dtype)), a.to(x.dtype)) * self.coarse.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype))

    def flops(self, tokens: int) -> Flops:
        """2 * tokens * matmul_macs forward. Factored, the factors are frozen, so backward is the input's
        gradient alone; materialised, the weight takes a gradient too (through ``coarse``). A streamed
        materialised weight is regenerated each call: its A B, 2 * out * rank * in, without gradient."""
        forward = 2 * tokens * self.matmul_macs
        flops = Flops(forward, forward * (1 if self.factored else 2))
        if self.streaming and not self.factored:
            flops += matmul_flops(self.out_features, self.rank, self.in_features, grads=0)
        return flops


class LoRABase(SeedCache):
    """Frozen seeded basis times a learnable row gain, plus a trainable low-rank adapter."""

    # The golf document stores adapters as int8 with one scale per row, whatever their size.
    storage_kinds = {"lora_a": "int8", "lora_b": "int8"}

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

    def flops(self, tokens: int) -> Flops:
        """x W^T on every token, 2 * tokens * in * out, plus B A once per call, 2 * out * rank * in;
        every factor is trainable, so each product's backward takes both gradients."""
        rank = self.lora_a.shape[0]
        return (matmul_flops(tokens, self.in_features, self.out_features)
                + matmul_flops(self.out_features, rank, self.in_features))


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
