"""The small training loop of the compositions: Adam on whatever parameters of a model still learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.errors import UserError


def train_steps(model: nn.Module, tokens: torch.Tensor, steps: int, batch_size: int, lr: float,
                generator: torch.Generator) -> float:
    """``steps`` Adam steps of the parameters of ``model`` that require grad, on random windows of
    ``tokens`` (a 1-D stream) one context long; returns the last step's loss (nan for 0 steps)."""
    context = model.cfg.max_seq_len
    if len(tokens) < context + 2:
        raise UserError(f"the training text has {len(tokens)} tokens, fewer than one context of {context}")
    window = torch.arange(context + 1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    was_training = model.training
    model.train()
    for _ in range(steps):
        rows = tokens[torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)[:, None] + window]
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.train(was_training)
    return loss.item()
