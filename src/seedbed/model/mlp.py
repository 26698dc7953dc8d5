"""Position-wise MLP: up-projection, squared activation, zero-initialised down-projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.layers import BuildContext
from seedbed.perf import Flops
from seedbed.registry import FFNS, require

ACTIVATIONS = {
    "relu2": lambda x: F.relu(x).square(),
    "leaky_relu2": lambda x: F.leaky_relu(x, 0.5).square(),
    "gelu": F.gelu,
    "silu": F.silu,
}


@FFNS.register("mlp")
class MLP(nn.Module):
    @dataclass
    class Options:
        mult: float = 4.0  # hidden width = mult * d_model
        activation: str = "relu2"  # relu2 | leaky_relu2 (LeakyReLU(0.5)^2) | gelu | silu

        def check(self, where: str) -> None:
            require(self.mult > 0, f"{where}.mult must be positive, got {self.mult}")
            require(self.activation in ACTIVATIONS,
                    f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        hidden = max(1, round(options.mult * ctx.d_model))
        self.up = ctx.linear(ctx.d_model, hidden)
        self.down = ctx.linear(hidden, ctx.d_model, zero_init=True)
        self.activation = ACTIVATIONS[options.activation]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))

    def flops(self, batch: int, context: int) -> Flops:
        """up + down on every token: 2 * 2 * d * hidden per token for dense linears."""
        tokens = batch * context
        return self.up.flops(tokens) + self.down.flops(tokens)
