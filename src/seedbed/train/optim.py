"""Optimisers: AdamW, and Muon for hidden weight matrices.

Muon keeps a momentum of each matrix's gradient and replaces the update with the
nearest semi-orthogonal matrix, found by a quintic Newton-Schulz iteration. It applies
to 2-D weights inside the blocks and their shared parts; embeddings, the head, norms and scalars use AdamW.

The iteration runs in bf16 only where the device multiplies bf16 natively
(``seedbed.hardware.fast_dtype``); on a CPU without bf16 units it runs in fp32, which
there is about 10x faster than emulated bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seedbed.config import TrainConfig
from seedbed.hardware import fast_dtype

# Quintic coefficients that push every singular value towards 1 quickly (Jordan et al.).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix: U V^T of its SVD, singular values near 1.
    Computes in ``dtype``, by default the fastest exact-enough one for the grad's device."""
    a, b, c = NS_COEFFS
    x = grad.to(dtype or fast_dtype(grad.device))
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(grad.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"])
                # Scale so that tall and wide matrices get updates of similar RMS.
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A weight matrix inside the stack; tables of learned vectors (names ending in "embedding":
    an hourglass's latent queries and group positions) train with AdamW, as the token embedding does."""
    return param.ndim == 2 and name.startswith(("blocks.", "shared.")) and not name.endswith("embedding")


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One or two optimisers; each param group keeps its base lr in ``initial_lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adam_kwargs = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8)
    if cfg.optimizer == "adamw":
        optimizers = [torch.optim.AdamW([p for _, p in named], lr=cfg.lr, **adam_kwargs)]
    else:
        matrices = [p for n, p in named if is_hidden_matrix(n, p)]
        others = [p for n, p in named if not is_hidden_matrix(n, p)]
        optimizers = [torch.optim.AdamW(others, lr=cfg.lr, **adam_kwargs)]
        if matrices:
            optimizers.append(Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float, step: int, cfg: TrainConfig) -> float:
    """Warmup over the first steps, then the schedule over training progress in [0, 1]."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_frac
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(progress * math.pi))
    # warmdown: flat, then linear to the floor over the last warmdown_frac of training
    start = 1.0 - cfg.warmdown_frac
    if progress <= start or cfg.warmdown_frac == 0:
        return 1.0
    return floor + (1 - floor) * (1.0 - progress) / cfg.warmdown_frac
