"""Training 64-bit seeds without gradients ("Taming Optimized Randomization").

Seeds are integers, so gradient steps never touch them. Every ``every`` optimiser steps,
the search picks the next seeded module (round robin over every module holding a
``seeds`` buffer), proposes ``candidates`` variants that each redraw one of its seeds,
and scores the current seeds and every variant by the loss on one held batch (no
gradients). The best variant is kept only if it lowers that loss; otherwise the seeds
stay as they were, so the search never accepts a worse seed on its scoring batch. With
several processes the losses are averaged across ranks first, so all ranks agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

SEED_LOW, SEED_HIGH = -(2**63), 2**63 - 1


@dataclass
class SearchOutcome:
    module: str
    baseline: float
    best: float
    accepted: bool


class SeedSearch:
    def __init__(self, model: nn.Module, candidates: int, seed: int):
        self.targets = [(name, module) for name, module in model.named_modules()
                        if isinstance(getattr(module, "seeds", None), torch.Tensor)]
        self.candidates = candidates
        self.rng = torch.Generator().manual_seed(seed)
        self.next_target = 0

    def __bool__(self) -> bool:
        return bool(self.targets)

    @torch.no_grad()
    def step(self, score: Callable[[], torch.Tensor]) -> SearchOutcome:
        """One round on the next module; ``score`` returns the loss on the held batch."""
        name, module = self.targets[self.next_target % len(self.targets)]
        self.next_target += 1
        current = module.seeds.clone()
        proposals = []
        for _ in range(self.candidates):
            proposal = current.clone()
            slot = int(torch.randint(0, len(current), (1,), generator=self.rng))
            proposal[slot] = int(torch.randint(SEED_LOW, SEED_HIGH, (1,), generator=self.rng, dtype=torch.int64))
            proposals.append(proposal)
        losses = []
        for seeds in [current] + proposals:
            module.seeds.copy_(seeds)
            losses.append(score().detach().float().reshape(1))
        losses = torch.cat(losses)
        if dist.is_initialized():
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        best = int(losses[1:].argmin()) + 1
        accepted = bool(losses[best] < losses[0])
        module.seeds.copy_(proposals[best - 1] if accepted else current)
        return SearchOutcome(name, float(losses[0]), float(losses[best]), accepted)

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng.seed_search": self.rng.get_state(),
                "seed_search.next_target": torch.tensor(self.next_target)}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rng.set_state(tensors["rng.seed_search"])
        self.next_target = int(tensors["seed_search.next_target"])
