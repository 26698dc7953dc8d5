"""Denseformer depth-weighted averaging (Pagliardini et al. 2024, arXiv:2402.02622).

With X_0 the stack's input (the token embeddings, or an hourglass's latents) and X_i the
output of depth i (i = 1..N), which reads the previous average Y_{i-1}:

    X_i = layer_i(Y_{i-1}),      Y_0 = X_0
    Y_i = sum_{j in J_i} a_ij X_j      after every depth i with i % period == 0
    Y_i = X_i                          after the other depths
    J_i = { j in 0..i : (i - j) % dilation == 0 }

Every a_i starts one-hot on X_i (a_ii = 1), so an initialised Denseformer is exactly the
stack without it. The average is per position: a decoding step keeps the history of its own
positions only, and the stack's decode state needs nothing extra. Each depth stores |J_i|
scalars; the history costs N + 1 activations of the stack's length while it runs, which is
cheap inside an hourglass, where the sequence is short (the seed's reason to use it there).
"""

from __future__ import annotations

import torch
from torch import nn

from seedbed.config import DenseformerOptions


class DepthWeightedAverage(nn.Module):
    def __init__(self, n_layers: int, options: DenseformerOptions):
        super().__init__()
        dilation, period = options.dilation, options.period
        self.sources: dict[int, list[int]] = {
            depth: list(range(depth % dilation, depth + 1, dilation))
            for depth in range(1, n_layers + 1) if depth % period == 0}
        # weights[str(i)][m] weighs X_{sources[i][m]}; one-hot on X_i (the last source) at init.
        self.weights = nn.ParameterDict({
            str(depth): nn.Parameter(torch.eye(len(js))[-1]) for depth, js in self.sources.items()})

    def forward(self, depth: int, history: list[torch.Tensor]) -> torch.Tensor:
        """Y_depth from ``history`` = [X_0, ..., X_depth]."""
        if depth not in self.sources:
            return history[depth]
        weights = self.weights[str(depth)].to(history[depth].dtype)
        out = weights[0] * history[self.sources[depth][0]]
        for weight, j in zip(weights[1:], self.sources[depth][1:]):
            out = out + weight * history[j]
        return out

    def reference(self, depth: int, history: list[torch.Tensor]) -> torch.Tensor:
        """The same average as a dense sum over all earlier depths with zero weights outside J_i."""
        if depth not in self.sources:
            return history[depth]
        dense = torch.zeros(depth + 1, dtype=history[0].dtype)
        dense[self.sources[depth]] = self.weights[str(depth)].detach().to(dense.dtype)
        return torch.einsum("j,j...->...", dense, torch.stack(history[:depth + 1]))
