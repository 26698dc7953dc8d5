"""GERMINATOR's generalist and expert rank mixer: experts chosen by ``token % n``.

For every split ``n`` in ``splits`` (e.g. 2, 3, 5, 7) the layer holds ``n`` experts, and
the token at position t uses expert ``e_n = token[t] mod n`` of each split: routing by the
input token id, deterministic and causal, with no router network and no balance loss.
Expert ``e`` of split ``n`` is a seeded low-rank map of rank ``r_n`` with one learnable
rank scalar ``s_{n,e}`` (initialised to 0, so training starts from the generalist)::

    z_n = s_{n,e_n} * V_{n,e_n} x                  V: (r_n, d), generated from a seed
    z   = [z_2; z_3; z_5; ...]                      concatenated, R = sum of r_n
    z'  = z + (P z) * (Q z)                         rank mixer: a bilinear layer, P, Q: (R, R)
    y   = generalist(x) + sum_n U_{n,e_n} z'_n      U: (d, r_n), generated from a seed

The rank mixer lets experts of different ranks (and splits) modulate each other
multiplicatively before projecting back; ``Q`` starts at zero, so it begins as the
identity. Experts are evaluated batched: every split's projections for all its experts
are one matmul, the token's expert is picked with a gather, and the way back is one
matmul from a one-hot scatter, with no Python loop over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from seedbed.model.layers import BuildContext
from seedbed.model.mlp import MLP
from seedbed.model.seeded import SeedCache
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import FFNS, require
from seedbed.seeds import random_int8


class SeededExperts(SeedCache):
    """The ``n`` experts of one split: generated down (V) and up (U) maps, learnable rank scalars."""

    def __init__(self, d_model: int, n_experts: int, rank: int):
        super().__init__(2)
        self.d_model, self.n_experts, self.rank = d_model, n_experts, rank
        self.rank_scalars = nn.Parameter(torch.zeros(n_experts))

    def build(self, seeds: tuple[int, ...]) -> torch.Tensor:
        """[V; U^T] stacked: (2 * n * r, d), each int8 / 128 scaled to unit-variance outputs."""
        rows = self.n_experts * self.rank
        down = random_int8(seeds[0], (rows, self.d_model)).float() / 128 / math.sqrt(self.d_model / 3)
        up = random_int8(seeds[1], (rows, self.d_model)).float() / 128 / math.sqrt(self.rank / 3)
        return torch.cat([down, up])

    @property
    def virtual_numel(self) -> int:
        return 2 * self.n_experts * self.rank * self.d_model + self.n_experts

    def down(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, r): every expert's projection in one matmul, then the chosen one's."""
        v = self.generated(self.build)[: self.n_experts * self.rank]
        projections = (x @ v.T.to(x.dtype)).view(-1, self.n_experts, self.rank)
        chosen = projections.gather(1, expert[:, None, None].expand(-1, 1, self.rank))[:, 0]
        return chosen * self.rank_scalars[expert, None].to(x.dtype)

    def up(self, z: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """(N, r) -> (N, d): scatter into the chosen expert's slot, one matmul back."""
        u = self.generated(self.build)[self.n_experts * self.rank:]
        slots = z.new_zeros(z.shape[0], self.n_experts, self.rank)
        slots.scatter_(1, expert[:, None, None].expand(-1, 1, self.rank), z[:, None, :])
        return slots.view(z.shape[0], -1) @ u.to(z.dtype)


@FFNS.register("modulo-experts")
class ModuloExperts(nn.Module):
    needs_tokens = True  # routes by token id: it cannot run where there are no tokens (an hourglass's latents)
    @dataclass
    class Options:
        splits: list[int] = field(default_factory=lambda: [2, 3, 5, 7])
        ranks: list[int] = field(default_factory=lambda: [8, 8, 8, 8])  # one rank per split
        generalist_mult: float = 2.0  # hidden width of the shared MLP; 0 drops it
        activation: str = "relu2"
        rank_mixer: bool = True

        def check(self, where: str) -> None:
            require(len(self.splits) > 0 and all(n > 0 for n in self.splits), f"{where}.splits must be positive")
            require(len(self.ranks) == len(self.splits), f"{where}.ranks needs one rank per split")
            require(all(r > 0 for r in self.ranks), f"{where}.ranks must be positive")
            require(self.generalist_mult >= 0, f"{where}.generalist_mult must be >= 0")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        self.splits = list(options.splits)
        self.experts = nn.ModuleList(SeededExperts(ctx.d_model, n, r) for n, r in zip(options.splits, options.ranks))
        self.generalist = (MLP(MLP.Options(options.generalist_mult, options.activation), ctx)
                           if options.generalist_mult > 0 else None)
        total_rank = sum(options.ranks)
        self.mix_p = nn.Parameter(torch.randn(total_rank, total_rank) / math.sqrt(total_rank)) \
            if options.rank_mixer else None
        self.mix_q = nn.Parameter(torch.zeros(total_rank, total_rank)) if options.rank_mixer else None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat, ids = x.reshape(-1, shape[-1]), tokens.reshape(-1)
        choices = [ids % n for n in self.splits]
        z = torch.cat([experts.down(flat, e) for experts, e in zip(self.experts, choices)], dim=-1)
        if self.mix_p is not None:
            z = z + (z @ self.mix_p.T.to(z.dtype)) * (z @ self.mix_q.T.to(z.dtype))
        out = sum(experts.up(part, e) for experts, e, part in
                  zip(self.experts, choices, z.split([ex.rank for ex in self.experts], dim=-1)))
        out = out.view(shape)
        return out + self.generalist(x, tokens) if self.generalist is not None else out

    def flops(self, batch: int, context: int) -> Flops:
        """Every split projects each token through all its n experts, down and up, against frozen
        generated maps (backward: the input's gradient only); then the rank mixer's two R x R matmuls
        and the generalist MLP::

            forward = 2 * 2 * d * sum_n(n r_n) + 2 * 2 * R^2 per token, + generalist
        """
        tokens, d = batch * context, self.experts[0].d_model
        total_rank = sum(experts.rank for experts in self.experts)
        flops = sum((matmul_flops(tokens, d, ex.n_experts * ex.rank, grads=1)
                     + matmul_flops(tokens, ex.n_experts * ex.rank, d, grads=1) for ex in self.experts), Flops())
        if self.mix_p is not None:
            flops += 2 * matmul_flops(tokens, total_rank, total_rank)
        return flops + self.generalist.flops(batch, context) if self.generalist is not None else flops
