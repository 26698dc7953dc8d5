"""The small training loop of the compositions: Adam on whatever parameters of a model still learn."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.errors import UserError


@dataclass
class Fit:
    loss: float  # the last step's (nan for no step)
    steps: int
    seconds: float


def train_steps(model: nn.Module, tokens: torch.Tensor, batch_size: int, lr: float, generator: torch.Generator,
                steps: int = 0, seconds: float = 0.0) -> Fit:
    """Adam steps of the parameters of ``model`` that require grad, on random windows of ``tokens``
    (a 1-D stream) one context long: ``steps`` of them, or as many as start within ``seconds``."""
    if (steps > 0) == (seconds > 0):
        raise ValueError("give exactly one budget: steps or seconds")
    context = model.cfg.max_seq_len
    if len(tokens) < context + 2:
        raise UserError(f"the training text has {len(tokens)} tokens, fewer than one context of {context}")
    window = torch.arange(context + 1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    was_training = model.training
    model.train()
    start, done = time.perf_counter(), 0
    while done < steps if steps else time.perf_counter() - start < seconds:
        rows = tokens[torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)[:, None] + window]
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
    model.train(was_training)
    return Fit(loss.item(), done, time.perf_counter() - start)
