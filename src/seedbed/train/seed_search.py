"""Training 64-bit seeds without gradients ("Taming Optimized Randomization").

Seeds are integers, so gradient steps never touch them. Every ``every`` optimiser steps,
the search runs one round on the next seeded module (round robin over every module
holding a ``seeds`` buffer):

1. Propose ``candidates`` variants of its seeds, each redrawing one seed.
2. Selection: score the current seeds and every variant on one batch (no gradients) and
   pick the variant with the lowest mean loss.
3. Acceptance: score the current seeds and that variant on a second, independent batch.
   Keep the variant only if its per-sequence losses there are lower than the current
   seeds' by more than ``margin`` standard errors of the paired difference; otherwise
   restore the current seeds.

Why two batches: the best of N noisy scores is biased low (the winner's curse), so
accepting on the batch that did the picking mostly accepts noise. On a fresh batch the
chosen variant's score is unbiased, and the decision uses that batch alone.

Why a margin: a redraw does not nudge a weight matrix, it replaces the generated part
under row scales (and downstream weights) trained for the old one, so nearly every
proposal is worse. With such a prior a bare sign test still lets harmful proposals
through whenever the acceptance batch's noise exceeds their harm; asking for
``margin`` standard errors (of the per-sequence paired differences, which cancel the
batch's own difficulty) bounds how often that happens. With one sequence there is no
spread to measure, and the test becomes the bare comparison.

Scorers return one loss per sequence. With several processes the sums, squares and
counts are added across ranks first, so every rank takes the same decision.
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
    select_before: float  # mean loss of the current seeds on the selection batch
    select_best: float  # the chosen proposal's there (biased low: it won there)
    accept_before: float  # the current seeds' on the acceptance batch
    accept_best: float  # the chosen proposal's there (unbiased)
    accept_stderr: float  # standard error of the paired difference accept_best - accept_before
    accepted: bool


def pooled_mean_and_stderr(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and its standard error for each row of per-sequence values (k, n), over all ranks."""
    n = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.float32, device=rows.device)
    stats = torch.stack([rows.float().sum(1), rows.float().square().sum(1), n])
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    variance = (squares - n * mean.square()).clamp_min(0) / (n - 1).clamp_min(1)
    return mean, (variance / n).sqrt()


class SeedSearch:
    def __init__(self, model: nn.Module, candidates: int, seed: int, margin: float = 2.0):
        self.targets = [(name, module) for name, module in model.named_modules()
                        if isinstance(getattr(module, "seeds", None), torch.Tensor)]
        self.candidates = candidates
        self.margin = margin
        self.rng = torch.Generator().manual_seed(seed)
        self.next_target = 0

    def __bool__(self) -> bool:
        return bool(self.targets)

    def propose(self, current: torch.Tensor) -> list[torch.Tensor]:
        proposals = []
        for _ in range(self.candidates):
            proposal = current.clone()
            slot = int(torch.randint(0, len(current), (1,), generator=self.rng))
            proposal[slot] = int(torch.randint(SEED_LOW, SEED_HIGH, (1,), generator=self.rng, dtype=torch.int64))
            proposals.append(proposal)
        return proposals

    @torch.no_grad()
    def step(self, select: Callable[[], torch.Tensor], accept: Callable[[], torch.Tensor]) -> SearchOutcome:
        """One round on the next module. ``select`` and ``accept`` each return the model's
        per-sequence losses (n,) on their own batch, for whatever seeds the module holds."""
        name, module = self.targets[self.next_target % len(self.targets)]
        self.next_target += 1
        current = module.seeds.clone()
        proposals = self.propose(current)

        def losses(score: Callable[[], torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
            module.seeds.copy_(seeds)
            return score().detach().float()

        selection, _ = pooled_mean_and_stderr(torch.stack([losses(select, s) for s in [current, *proposals]]))
        best = int(selection[1:].argmin())
        before, after = losses(accept, current), losses(accept, proposals[best])
        # Paired per sequence: the difference cancels how hard each sequence is.
        means, stderrs = pooled_mean_and_stderr(torch.stack([before, after, after - before]))
        accepted = bool(means[2] + self.margin * stderrs[2] < 0)
        module.seeds.copy_(proposals[best] if accepted else current)
        return SearchOutcome(name, float(selection[0]), float(selection[best + 1]), float(means[0]),
                             float(means[1]), float(stderrs[2]), accepted)

    def state(self) -> dict[str, torch.Tensor]:
        return {"rng.seed_search": self.rng.get_state(),
                "seed_search.next_target": torch.tensor(self.next_target)}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rng.set_state(tensors["rng.seed_search"])
        self.next_target = int(tensors["seed_search.next_target"])
