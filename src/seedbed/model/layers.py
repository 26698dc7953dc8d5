"""Building pieces every block uses: linears and norms, looked up by kind.

Components never construct ``nn.Linear`` directly: they call ``ctx.linear(...)`` so a
config can swap every weight matrix for another kind (ternary, seed-generated, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.perf import Flops, matmul_flops
from seedbed.registry import LINEARS, NORMS


def initial_weight(in_features: int, out_features: int, init_std: float, zero_init: bool) -> nn.Parameter:
    """An (out, in) weight: zeros, or a normal of std ``init_std`` (0: 1/sqrt(in_features)) cut at 3 std,
    so that no single weight starts far out in the tail."""
    weight = torch.empty(out_features, in_features)
    std = init_std or 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        if zero_init:
            weight.zero_()
        else:
            nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
    return nn.Parameter(weight)


@LINEARS.register("dense")
class DenseLinear(nn.Module):
    """A plain float weight matrix, ``y = x W^T``, no bias."""

    @dataclass
    class Options:
        init_std: float = 0.0  # 0: 1/sqrt(in_features)

    def __init__(self, in_features: int, out_features: int, options: Options, zero_init: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = initial_weight(in_features, out_features, options.init_std, zero_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def flops(self, tokens: int) -> Flops:
        """x W^T: 2 * tokens * in * out forward; backward the input's and the weight's gradients."""
        return matmul_flops(tokens, self.in_features, self.out_features)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm with an optional learnable gain."""

    @dataclass
    class Options:
        eps: float = 1e-6
        learnable: bool = True

    def __init__(self, dim: int, options: Options):
        super().__init__()
        self.eps = options.eps
        self.weight = nn.Parameter(torch.ones(dim)) if options.learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class PerUseLoRA(nn.Module):
    """A linear shared by several depths, with one low-rank adapter per use (Zamba2)::

        y = base(x) + (x A_u^T) B_u^T      A_u (rank, in), B_u (out, rank), use u = ``self.use``

    B starts at zero, so every use starts as the shared linear. The stack sets ``use`` before
    each call (``SharedParts.select``); the adapters are stacked (uses, ...) tensors, so the
    optimiser treats them as the small 3-D parameters they are (AdamW), not as hidden matrices.
    """

    def __init__(self, base: nn.Module, uses: int, rank: int):
        super().__init__()
        self.base, self.use = base, 0
        self.lora_a = nn.Parameter(torch.randn(uses, rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(uses, base.out_features, rank))
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a[self.use].to(x.dtype), self.lora_b[self.use].to(x.dtype)
        return self.base(x) + F.linear(F.linear(x, a), b)

    def flops(self, tokens: int) -> Flops:
        rank = self.lora_a.shape[1]
        return (self.base.flops(tokens) + matmul_flops(tokens, self.in_features, rank)
                + matmul_flops(tokens, rank, self.out_features))


@dataclass
class BuildContext:
    """What a component needs to know about the model it is built into."""

    d_model: int
    n_layers: int
    layer_index: int
    max_seq_len: int
    linear_spec: dict[str, Any]
    norm_spec: dict[str, Any]
    lora_uses: int = 0  # building a module shared by this many depths, with a LoRA per use ...
    lora_rank: int = 0  # ... of this rank (0: no adapters)
    model: Any = None  # the ModelConfig, for components that build inner stacks (an hourglass)
    path: tuple[str, ...] = ()  # the blocks being built around this component, outermost first
    where: str = "model"  # the component's config key, for its errors (model.blocks.NAME.mixer)

    def linear(self, in_features: int, out_features: int, zero_init: bool = False,
               spec: dict[str, Any] | None = None) -> nn.Module:
        entry, options = LINEARS.options(spec or self.linear_spec, "model.linear")
        linear = entry.cls(in_features, out_features, options, zero_init=zero_init)
        return PerUseLoRA(linear, self.lora_uses, self.lora_rank) if self.lora_rank else linear

    def norm(self, dim: int) -> nn.Module:
        entry, options = NORMS.options(self.norm_spec, "model.norm")
        return entry.cls(dim, options)
