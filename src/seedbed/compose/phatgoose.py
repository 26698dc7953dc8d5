"""PHATGOOSE (Muqeeth et al. 2024): per-token, per-layer routing among LoRA experts by their own gates.

Every dense linear y = W x of a frozen base LM (the output head aside) carries E LoRA modules
(A_e: r x d_in, B_e: d_out x r) and E gate vectors g_e in R^{d_in}. There are three modes:

    expert e   y = W x + B_e A_e x                          (training module e: only A_e, B_e learn)
    gate e     y = W x + sigmoid(g_e . x) B_e A_e x         (then its gate: only g_e learns)
    routed     y = W x + sum_{e in top-k(s)} w_e B_e A_e x  (composed; nothing learns)

    s_e = std(g_e) . std(x) / sqrt(d_in),   std(v) = (v - mean v) / (sd v + eps)
    w = softmax of s over the top k modules

Each module and its gate are trained by one contributor on one cluster, independently of
the others (``train_module``: one module, E = 1); composing stacks them. B starts at zero and
the gates at zero, so a fresh module is the base model; routing is per token from the
activation at that token only, so the composed model is causal and steps exactly as it runs
in parallel (the base's own caches carry everything).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.compose.fit import train_steps
from seedbed.errors import UserError
from seedbed.model.layers import DenseLinear
from seedbed.model.lm import LM, PlainDecoding

STANDARDISE_EPS = 1e-6


def standardise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True, unbiased=False) + STANDARDISE_EPS)


class LoRALibrary(nn.Module):
    """A frozen dense linear with E LoRA modules and their gates (see the module docstring)."""

    def __init__(self, base: DenseLinear, experts: int, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.lora_a = nn.Parameter(torch.randn(experts, rank, d_in) / math.sqrt(d_in))
        self.lora_b = nn.Parameter(torch.zeros(experts, d_out, rank))
        self.gates = nn.Parameter(torch.zeros(experts, d_in))
        self.mode, self.index, self.top_k = "routed", 0, 1

    def module_output(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_a[e].to(x.dtype)), self.lora_b[e].to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.mode == "expert":
            return y + self.module_output(x, self.index)
        if self.mode == "gate":
            gate = torch.sigmoid(x @ self.gates[self.index].to(x.dtype))
            return y + gate[..., None] * self.module_output(x, self.index)
        scores = standardise(x) @ standardise(self.gates).to(x.dtype).T / math.sqrt(x.shape[-1])  # (..., E)
        top = scores.topk(min(self.top_k, scores.shape[-1]), -1)
        weights = torch.zeros_like(scores).scatter(-1, top.indices, top.values.softmax(-1))
        low = torch.einsum("...i,eri->...er", x, self.lora_a.to(x.dtype))
        return y + torch.einsum("...er,eor,...e->...o", low, self.lora_b.to(x.dtype), weights)


def reference_routed(library: LoRALibrary, x: torch.Tensor) -> torch.Tensor:
    """The routed output one token at a time with plain loops (for tests)."""
    rows = []
    for v in x.reshape(-1, x.shape[-1]):
        scores = torch.stack([standardise(g) @ standardise(v) for g in library.gates]) / math.sqrt(len(v))
        kept = scores.topk(min(library.top_k, len(scores))).indices
        weights = scores[kept].softmax(-1)
        out = library.base(v)
        for w, e in zip(weights, kept, strict=True):
            out = out + w * (library.lora_b[e] @ (library.lora_a[e] @ v))
        rows.append(out)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def adapted_linears(model: LM) -> list[str]:
    """Names of the dense linears that carry modules: every one but the output head."""
    return [name for name, module in model.named_modules() if isinstance(module, DenseLinear) and name != "head"]


class PhatGoose(PlainDecoding, nn.Module):
    """A base LM whose dense linears are ``LoRALibrary``s; answers like the LM it wraps.

    It takes the model over: the linears are replaced in place and the base is frozen."""

    label = "PHATGOOSE"

    def __init__(self, model: LM, experts: int, rank: int, top_k: int = 2):
        super().__init__()
        if not adapted_linears(model):
            raise UserError("PHATGOOSE needs a base model with dense linears (model.linear.kind=dense)")
        for name in adapted_linears(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALibrary(getattr(parent, child), experts, rank))
        self.model, self.experts, self.rank = model.requires_grad_(False), experts, rank
        self.cfg = model.cfg
        self.set_mode("routed", top_k=top_k)

    def libraries(self) -> list[LoRALibrary]:
        return [m for m in self.modules() if isinstance(m, LoRALibrary)]

    def set_mode(self, mode: str, index: int = 0, top_k: int | None = None) -> None:
        """``expert`` / ``gate`` e (training, with only those parameters learning) or ``routed``."""
        for library in self.libraries():
            library.mode, library.index = mode, index
            library.top_k = top_k if top_k is not None else library.top_k
            library.lora_a.requires_grad_(mode == "expert")
            library.lora_b.requires_grad_(mode == "expert")
            library.gates.requires_grad_(mode == "gate")

    @property
    def top_k(self) -> int:
        return self.libraries()[0].top_k

    def composition(self) -> dict:
        return {"kind": "phatgoose", "members": self.experts, "rank": self.rank, "top_k": self.top_k,
                "models": [dataclasses.asdict(self.cfg)]}

    def module_tensors(self, e: int) -> dict[str, torch.Tensor]:
        """Module e's LoRA and gate, named by the linear they adapt."""
        out = {}
        for name, library in self.named_modules():
            if isinstance(library, LoRALibrary):
                for part in ("lora_a", "lora_b", "gates"):
                    out[f"{name}.{part}"] = getattr(library, part)[e].detach().clone()
        return out

    def load_module(self, e: int, tensors: dict[str, torch.Tensor], where: str) -> None:
        expected = self.module_tensors(e)
        if set(tensors) != set(expected) or any(tensors[n].shape != t.shape for n, t in expected.items()):
            raise UserError(f"{where} does not fit this base model (different linears or rank)")
        with torch.no_grad():
            for name, library in self.named_modules():
                if isinstance(library, LoRALibrary):
                    for part in ("lora_a", "lora_b", "gates"):
                        getattr(library, part)[e].copy_(tensors[f"{name}.{part}"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.log_probs(tokens)

    def init_state(self, batch: int, max_len: int) -> list:
        return self.model.init_state(batch, max_len)

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        return self.model.step(tokens, state)


def train_module(model: PhatGoose, tokens: torch.Tensor, batch_size: int, lr: float, seed: int, budget: dict,
                 gate_budget: dict) -> dict[str, float]:
    """Train module 0 of ``model`` (E = 1) on ``tokens`` (a 1-D stream): Adam on its LoRA for
    ``budget``, then on its gate, LoRA frozen, for ``gate_budget`` (each ``steps=N`` or
    ``seconds=S``). Returns the last losses, the steps and the seconds of both."""
    generator = torch.Generator().manual_seed(seed)
    model.set_mode("expert", 0)
    module = train_steps(model, tokens, batch_size, lr, generator, **budget)
    model.set_mode("gate", 0)
    gate = train_steps(model, tokens, batch_size, lr, generator, **gate_budget)
    model.set_mode("routed")
    model.eval()
    return {"module_loss": module.loss, "module_steps": module.steps, "gate_loss": gate.loss,
            "gate_steps": gate.steps, "seconds": module.seconds + gate.seconds}
