"""Mixture of depths (Raposo et al. 2024): a router sends only some tokens through a block.

A routed block (``model.blocks.NAME.mixture_of_depths = {capacity = 0.125}``) gives each
token a scalar router logit r_t = w . rms(h_t) + b (rms: h / RMS(h), so the logits' scale does
not follow the residual stream's growth with depth). The tokens it picks run the whole block
(mixer and feed-forward, over the sub-sequence of picked tokens, in order); the others
ride the residual stream unchanged::

    h_t <- h_t + sigmoid(r_t) * (block(H_picked)_t - h_t)      if t is picked
    h_t <- h_t                                                 otherwise

The block's change is scaled by the router weight sigmoid(r_t), so the router gets a gradient
from the language-model loss.

Which tokens. The paper picks the top ``capacity`` fraction of each sequence by r (k =
ceil(capacity * T) per row): compute is fixed, but the choice at t depends on the router
logits of later tokens, so it cannot be used to score or generate text honestly. Training also
fits a *causal decision* from token t alone, trained by binary cross-entropy towards the top-k
choice (weight ``aux_coef``, an auxiliary loss like an MoE's balance loss):

    causal = "router":     picked_t = [r_t > 0], the BCE on r itself (the paper's first method);
    causal = "predictor":  picked_t = [p(stop_grad(h_t)) > 0], a small MLP p fitted by the BCE
                           (the paper's second method; the router itself is left to the LM loss).

Evaluation, generation and compression use only the causal decision (``forward`` in eval mode
never ranks tokens over the sequence), so the honest bpb never reads a later token. With
``train_decision = "causal"`` training uses it too (the top-k choice then only sets the BCE
targets), which makes the training forward causal as well.

Measured per call and kept on the module: ``picked_fraction`` (the compute that runs: with the
causal decision it is not fixed) and, in training, ``disagreement``: the share of tokens where
the causal decision differs from the top-k choice.

Decoding. A routed block keeps one decode state per batch row, because rows pick different
tokens and a state only ever holds the tokens its row picked; a step runs each row's picked
tokens of the chunk through the block with that row's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.moe import record_aux_loss
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import build_dataclass, require

TRAIN_DECISIONS = ("topk", "causal")
CAUSAL_DECISIONS = ("router", "predictor")


@dataclass
class DepthRoutingOptions:
    capacity: float = 0.0  # the fraction of each sequence's tokens the block runs on; 0: no routing
    train_decision: str = "topk"  # topk (the paper: fixed compute, not causal) | causal
    causal: str = "router"  # router: sign of the router logit | predictor: a small MLP on the detached input
    aux_coef: float = 0.1  # weight of the BCE that fits the causal decision to the top-k choice
    predictor_hidden: int = 0  # the predictor's hidden width; 0: d_model // 8

    def check(self, where: str) -> None:
        require(0 <= self.capacity <= 1, f"{where}.capacity must be in [0, 1], got {self.capacity}")
        require(self.train_decision in TRAIN_DECISIONS,
                f"{where}.train_decision must be one of {', '.join(TRAIN_DECISIONS)}, got {self.train_decision!r}")
        require(self.causal in CAUSAL_DECISIONS,
                f"{where}.causal must be one of {', '.join(CAUSAL_DECISIONS)}, got {self.causal!r}")
        require(self.aux_coef >= 0, f"{where}.aux_coef must be >= 0, got {self.aux_coef}")
        require(self.predictor_hidden >= 0, f"{where}.predictor_hidden must be >= 0, got {self.predictor_hidden}")


def depth_routing_options(values: dict, where: str) -> DepthRoutingOptions:
    return build_dataclass(DepthRoutingOptions, values, where)


class DepthRouter(nn.Module):
    """Decides which tokens a block runs on, and with what weight; see the module docstring."""

    def __init__(self, options: DepthRoutingOptions, d_model: int):
        super().__init__()
        self.capacity, self.train_decision = options.capacity, options.train_decision
        self.aux_coef = options.aux_coef
        self.router = nn.Linear(d_model, 1)
        nn.init.normal_(self.router.weight, std=d_model ** -0.5)  # r ~ N(0, 1) at start
        nn.init.zeros_(self.router.bias)
        if options.causal == "predictor":
            hidden = options.predictor_hidden or max(1, d_model // 8)
            self.predictor = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            self.predictor = None
        self.aux_loss: torch.Tensor | None = None
        self.sums_over_calls = False
        self.picked_fraction: torch.Tensor | None = None
        self.disagreement: torch.Tensor | None = None

    def flops(self, tokens: int) -> Flops:
        """The router on every token, and the predictor (whose input takes no gradient)."""
        total = matmul_flops(tokens, self.router.in_features, 1)
        if self.predictor is not None:
            first, second = self.predictor[0], self.predictor[2]
            total = total + matmul_flops(tokens, first.in_features, first.out_features, grads=1)
            total = total + matmul_flops(tokens, second.in_features, 1)
        return total

    def top_k(self, logits: torch.Tensor) -> torch.Tensor:
        """The paper's choice: the ceil(capacity * T) highest router logits of each row (B, T)."""
        k = math.ceil(self.capacity * logits.shape[1])
        picked = torch.zeros_like(logits, dtype=torch.bool)
        return picked.scatter(1, logits.topk(k, dim=1).indices, True)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which tokens of h (B, T, d) run the block (bool, B x T) and their weights sigmoid(r) (B, T)."""
        u = F.rms_norm(h, (h.shape[-1],))
        logits = self.router(u).squeeze(-1).float()
        causal_logits = logits if self.predictor is None else self.predictor(u.detach()).squeeze(-1).float()
        causal = causal_logits > 0
        if self.training:
            top = self.top_k(logits.detach())
            picked = top if self.train_decision == "topk" else causal
            loss = F.binary_cross_entropy_with_logits(causal_logits, top.float())
            record_aux_loss(self, self.aux_coef * loss)
            self.disagreement = (causal != top).float().mean().detach()
        else:
            picked, self.aux_loss, self.disagreement = causal, None, None
        self.picked_fraction = picked.float().mean().detach()
        return picked, torch.sigmoid(logits).to(h.dtype)


def gather_picked(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For picked (B, T): each row's picked positions in order, padded to the largest count C
    with unpicked positions after them (B, C), and which entries are real (B, C)."""
    counts = picked.sum(1)
    width = int(counts.max())
    # A stable sort on "not picked" puts each row's picked positions first, in position order.
    order = torch.sort((~picked).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    real = torch.arange(width, device=picked.device)[None] < counts[:, None]
    return order, real


def depth_routing_metrics(model: nn.Module) -> dict[str, float]:
    """Of the last forward, averaged over routed blocks: the share of tokens that ran each block,
    and in training the share where the causal decision differs from top-k; {} without routing."""
    routers = [m for m in model.modules() if isinstance(m, DepthRouter) and m.picked_fraction is not None]
    if not routers:
        return {}
    metrics = {"mod_picked_fraction": sum(float(r.picked_fraction) for r in routers) / len(routers)}
    disagreeing = [float(r.disagreement) for r in routers if r.disagreement is not None]
    if disagreeing:
        metrics["mod_disagreement"] = sum(disagreeing) / len(disagreeing)
    return metrics
