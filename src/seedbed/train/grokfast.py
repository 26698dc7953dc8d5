"""Grokfast: amplify the slow part of the gradient (Lee et al. 2024, "Grokfast: Accelerated
Grokking by Amplifying Slow Gradients", arXiv:2405.20233).

Each step's gradient g_t is treated as a signal over training steps. A low-pass filter of
that signal (its slow component, which the paper links to generalisation) is added back,
amplified by lambda, before clipping and the optimiser step:

- ``ema``:  e_t = alpha * e_{t-1} + (1 - alpha) * g_t,    g_t <- g_t + lambda * e_t,
  with e_0 = g_1, as the paper's ``gradfilter_ema`` starts it; so e_1 = g_1 and the first
  step's gradient is (1 + lambda) g_1.
- ``ma``:   m_t = (1 / w) * sum_{k = t-w+1..t} g_k,        g_t <- g_t + lambda * m_t,
  the mean of the last w raw (unfiltered) gradients, the current one included. As in the
  paper's ``gradfilter_ma`` with its default ``warmup=True``, nothing is changed until w
  gradients have been seen: steps 1..w-1 pass their gradient through untouched, step w is
  the first filtered one.

The filter runs on the gradients every rank holds after DDP's all-reduce, so all ranks
filter identical gradients and stay in sync. A parameter that has no gradient at a step is
skipped (its state waits), and one seen for the first time starts its own state then.

The state is plain tensors keyed by parameter name, so a checkpoint holds it and a resumed
run continues bit for bit: one tensor per parameter for ``ema``; for ``ma`` a ring buffer of
w gradients per parameter (w times the model's size, in memory and in the checkpoint) and
the count of gradients seen. A run resumed with another kind or window (Grokfast switched
on after memorisation, say) starts the new filter's state afresh; alpha and lambda apply to
the state there is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from seedbed.config import GROKFAST_KINDS, TrainConfig

PREFIX = "grokfast."


class GradFilter:
    """The Grokfast gradient filter of one run; ``kind='none'`` does nothing."""

    def __init__(self, kind: str = "none", alpha: float = 0.98, lamb: float = 2.0, window: int = 100):
        if kind not in GROKFAST_KINDS:
            raise ValueError(f"grokfast kind must be one of {', '.join(GROKFAST_KINDS)}, got {kind!r}")
        self.kind, self.alpha, self.lamb, self.window = kind, alpha, lamb, window
        self.ema: dict[str, torch.Tensor] = {}  # ema: e per parameter
        self.buffers: dict[str, torch.Tensor] = {}  # ma: (window, *shape) ring buffer per parameter
        self.counts: dict[str, int] = {}  # ma: gradients seen per parameter

    @classmethod
    def from_config(cls, tcfg: TrainConfig) -> "GradFilter":
        return cls(tcfg.grokfast, tcfg.grokfast_alpha, tcfg.grokfast_lamb, tcfg.grokfast_window)

    def __bool__(self) -> bool:
        return self.kind != "none"

    @torch.no_grad()
    def apply(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Filter every parameter's ``.grad`` in place."""
        if not self:
            return
        for name, param in named_parameters:
            grad = param.grad
            if grad is None:
                continue
            if self.kind == "ema":
                self.apply_ema(name, grad)
            else:
                self.apply_ma(name, grad)

    def apply_ema(self, name: str, grad: torch.Tensor) -> None:
        ema = self.ema.get(name)
        if ema is None:
            ema = self.ema[name] = grad.detach().clone()  # e_0 = g_1
        ema.mul_(self.alpha).add_(grad, alpha=1 - self.alpha)
        grad.add_(ema, alpha=self.lamb)

    def apply_ma(self, name: str, grad: torch.Tensor) -> None:
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = grad.new_zeros((self.window, *grad.shape))
        count = self.counts.get(name, 0)
        buffer[count % self.window].copy_(grad)
        self.counts[name] = count = count + 1
        if count >= self.window:  # warm-up: untouched until the window is full
            grad.add_(buffer.sum(0), alpha=self.lamb / self.window)

    # -- checkpoints --------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Named tensors for a checkpoint: ``grokfast.ema.NAME``, ``grokfast.ma.NAME`` and
        ``grokfast.ma_count.NAME``."""
        tensors = {f"{PREFIX}ema.{name}": value for name, value in self.ema.items()}
        for name, buffer in self.buffers.items():
            tensors[f"{PREFIX}ma.{name}"] = buffer
            tensors[f"{PREFIX}ma_count.{name}"] = torch.tensor(self.counts[name], dtype=torch.int64)
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Take back what ``state`` saved, as far as it is this filter's: the state of another
        kind, or a window of another length, is dropped (other tensors are ignored)."""
        self.ema, self.buffers, self.counts = {}, {}, {}
        for key, value in tensors.items():
            if not key.startswith(PREFIX):
                continue
            part, name = key[len(PREFIX):].split(".", 1)
            if part == "ema" and self.kind == "ema":
                self.ema[name] = value.to(device).clone()
            elif part == "ma" and self.kind == "ma" and value.shape[0] == self.window:
                self.buffers[name] = value.to(device).clone()
                self.counts[name] = int(tensors[f"{PREFIX}ma_count.{name}"])
