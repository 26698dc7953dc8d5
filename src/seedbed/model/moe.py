"""Mixture of experts in the DeepSeekMoE style: many small routed experts plus shared ones.

Every token x goes through ``n_shared`` always-on experts and the ``top_k`` of
``n_routed`` fine-grained routed experts (each ``expert_mult * d_model`` wide, so one
MLP of width ``m * d`` is split into several experts of width ``m * d / n``)::

    p   = softmax(W_r x)                         router over all routed experts, float32
    S   = top_k(p)                               the chosen experts
    y   = sum_s shared_s(x) + sum_{i in S} p_i * expert_i(x)

The gates are the chosen softmax probabilities themselves, not renormalised over S
(as in DeepSeekMoE): a confident router gives its experts more weight and an unsure one
less, while the shared experts carry what every token needs. The router stays a dense
float matrix whatever the model's linear kind, because it is small and chooses discretely.

Balance loss (Switch Transformer / DeepSeekMoE expert level), over the N tokens of a batch::

    f_i = (assignments to expert i) / (N * top_k)     fraction of assignments, no gradient
    P_i = mean_t p_i(t)                               mean router probability
    L   = balance_coef * n_routed * sum_i f_i P_i         (n_routed + noop_experts with no-op experts)

A perfectly uniform router (every p_i = 1 / n_routed) gives ``L = balance_coef`` exactly;
one that sends everything to a single expert gives nearly ``n_routed * balance_coef``.
After each training forward ``aux_loss`` holds L (summed over its uses when the layer stack
shares one mixture between depths; ``LM.loss`` and the trainer add it to
the cross-entropy); in eval mode it is ``None``. ``expert_load`` always holds the
detached ``f`` of the last forward, and ``drop_fraction`` the share of dropped assignments.

Capacity (``capacity_factor`` c > 0, training only): each expert takes at most
``ceil(c * N * top_k / n_routed)`` assignments. Assignments are ranked first-choices
first, then by position in the flattened batch, and each expert keeps the earliest ones;
a dropped assignment contributes nothing, so a token whose every choice was dropped still
gets the shared experts. The capacity is shared by the whole batch, so one token's routing
can change another's output, even an earlier one's: this breaks strict causality, which is
why it is off by default and always off in eval mode.

Dispatch is batched: the (token, expert) assignments are sorted by expert, the tokens are
gathered into one contiguous slice per expert, each expert runs once on its slice (a loop
over experts, never over tokens), and the gated outputs are scattered back with
``index_add``. Every expert runs even on an empty slice so all parameters take part in
every step (distributed data parallel expects that). ``reference=True`` runs the same
equation one token at a time, with capacity decided by a plain counting loop.

Experts are any registered feed-forward (``expert = "mlp"`` or ``"kan"``, ...), built with
``expert_options``; ``expert_mult`` and ``activation`` fill the expert's ``mult`` and
``activation`` options when it has them, and ``expert_options`` override them.

No-op experts (integrated mixture of depths and experts, Raposo et al. 2024): ``noop_experts``
m > 0 adds m experts that compute nothing. The router chooses among n_routed + m, and a token
whose choice is a no-op expert gets nothing from it (with no shared experts and every choice a
no-op, the block leaves the token as it was), so the router learns which tokens need the
feed-forward at all. The balance loss, load and capacity count the no-op experts like the others.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seedbed.model.layers import BuildContext
from seedbed.model.mlp import ACTIVATIONS
from seedbed.perf import Flops
from seedbed.registry import FFNS, require


ROW_BUCKET = 64  # training pads each expert's slice to a multiple of this many rows


@FFNS.register("moe")
class MoE(nn.Module):
    @dataclass
    class Options:
        n_routed: int = 8
        n_shared: int = 1
        noop_experts: int = 0  # experts that return zero: integrated MoDE (the token skips the experts)
        top_k: int = 2
        expert_mult: float = 0.5  # hidden width of every expert = expert_mult * d_model
        activation: str = "relu2"
        balance_coef: float = 0.01
        capacity_factor: float = 0.0  # 0: no limit; training only, breaks strict causality
        expert: str = "mlp"  # any registered ffn except moe
        expert_options: dict[str, Any] = field(default_factory=dict)
        reference: bool = False  # per-token loop instead of the batched dispatch

        def check(self, where: str) -> None:
            require(self.n_routed >= 1, f"{where}.n_routed must be >= 1, got {self.n_routed}")
            require(self.n_shared >= 0, f"{where}.n_shared must be >= 0, got {self.n_shared}")
            require(self.noop_experts >= 0, f"{where}.noop_experts must be >= 0, got {self.noop_experts}")
            choices = self.n_routed + self.noop_experts
            limit = f"n_routed={self.n_routed}" + (f" + noop_experts={self.noop_experts}" if self.noop_experts else "")
            require(1 <= self.top_k <= choices, f"{where}.top_k must be between 1 and {limit}, got {self.top_k}")
            require(self.expert_mult > 0, f"{where}.expert_mult must be positive, got {self.expert_mult}")
            require(self.activation in ACTIVATIONS,
                    f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
            require(self.balance_coef >= 0, f"{where}.balance_coef must be >= 0, got {self.balance_coef}")
            require(self.capacity_factor >= 0, f"{where}.capacity_factor must be >= 0, got {self.capacity_factor}")
            require(self.expert != "moe", f"{where}.expert cannot be moe itself")
            self.expert_spec(where)  # an unknown expert kind or option fails here, naming the key

        def expert_spec(self, where: str) -> tuple[Any, Any]:
            """The expert's registry entry and checked options."""
            entry = FFNS.get(self.expert, f"{where}.expert")
            names = {f.name for f in dataclasses.fields(entry.options)}
            defaults = {"mult": self.expert_mult, "activation": self.activation}
            spec = {key: value for key, value in defaults.items() if key in names}
            return FFNS.options({"kind": self.expert, **spec, **self.expert_options}, f"{where}.expert_options")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        self.n_routed, self.top_k = options.n_routed, options.top_k
        self.n_choices = options.n_routed + options.noop_experts  # routed experts, then the no-ops
        self.balance_coef, self.capacity_factor = options.balance_coef, options.capacity_factor
        self.reference = options.reference
        entry, expert_options = options.expert_spec("model.ffn")
        self.shared = nn.ModuleList(entry.cls(expert_options, ctx) for _ in range(options.n_shared))
        self.routed = nn.ModuleList(entry.cls(expert_options, ctx) for _ in range(options.n_routed))
        self.router = ctx.linear(ctx.d_model, self.n_choices, spec={"kind": "dense"})
        self.aux_loss: torch.Tensor | None = None
        # Shared by several depths (model/stack.py): add up the balance loss of every use in one
        # forward (``SharedParts.begin_forward`` starts it), instead of keeping only the last call's.
        self.sums_over_calls = False
        self.expert_load: torch.Tensor | None = None
        self.drop_fraction: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        flat, flat_tokens = x.reshape(-1, x.shape[-1]), tokens.reshape(-1)
        probs = self.router(flat).float().softmax(-1)
        gates, choices = probs.topk(self.top_k, dim=-1)
        capacity = self.capacity(flat.shape[0])
        dispatch = self.dispatch_per_token if self.reference else self.dispatch
        routed, kept = dispatch(flat, flat_tokens, gates, choices, capacity)
        self.record_routing(probs, choices, kept)
        shared = sum(expert(x, tokens) for expert in self.shared)
        return routed.view(x.shape) + shared

    def flops(self, batch: int, context: int) -> Flops:
        """Router, shared experts, and the top_k routed experts each token is sent to::

            router + n_shared * expert(N tokens) + expert(top_k N tokens) + (n_routed - 1) * expert(0 tokens)

        With no-op experts, the routed assignments are counted at the share a balanced router sends
        to real experts, top_k N n_routed / (n_routed + noop_experts).

        Every routed expert runs once per call on its slice; a feed-forward's cost is affine in its
        tokens, so the slices together cost one expert on all top_k N assignments plus the other experts'
        per-call work (zero for dense weights). Assignments dropped by capacity are counted too; the zero
        rows training pads each slice with (``run_padded``) are not: they are overhead, not the model's work.
        """
        tokens = batch * context
        expert = self.routed[0]
        assigned = self.top_k * tokens * self.n_routed // self.n_choices
        routed = expert.flops(1, assigned) + (self.n_routed - 1) * expert.flops(1, 0)
        return sum((e.flops(batch, context) for e in self.shared), self.router.flops(tokens)) + routed

    def capacity(self, n_tokens: int) -> int:
        """Assignments each expert may take; 0 means unlimited (always so in eval mode)."""
        if not self.training or self.capacity_factor == 0:
            return 0
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_choices)

    def dispatch(self, x: torch.Tensor, tokens: torch.Tensor, gates: torch.Tensor, choices: torch.Tensor,
                 capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed output (N, d) and which of the (N, top_k) assignments were kept, batched by expert."""
        n, k = choices.shape
        # Assignment a = j * n + t is token t's j-th choice: first choices come first, in token order.
        expert_of = choices.T.reshape(-1)
        token_of = torch.arange(n, device=x.device).repeat(k)
        order = torch.argsort(expert_of, stable=True)  # stable: keeps that priority within an expert
        sizes = torch.bincount(expert_of, minlength=self.n_choices)
        if capacity:
            first = sizes.cumsum(0) - sizes
            rank_in_expert = torch.arange(n * k, device=x.device) - first[expert_of[order]]
            order = order[rank_in_expert < capacity]
            sizes = sizes.clamp(max=capacity)
        kept = torch.zeros(n * k, dtype=torch.bool, device=x.device)
        kept[order] = True
        # No-op experts sort last: their assignments are kept but run nothing.
        order = order[:int(sizes[:self.n_routed].sum())]
        sizes = sizes[:self.n_routed].tolist()
        rows = token_of[order]
        slices = zip(self.routed, x[rows].split(sizes), tokens[rows].split(sizes))
        outputs = torch.cat([self.run_padded(expert, chunk, chunk_tokens) for expert, chunk, chunk_tokens in slices])
        weighted = outputs * gates.T.reshape(-1)[order, None]
        routed = weighted.new_zeros(n, x.shape[-1]).index_add_(0, rows, weighted)
        return routed, kept.view(k, n).T

    def run_padded(self, expert: nn.Module, chunk: torch.Tensor, chunk_tokens: torch.Tensor) -> torch.Tensor:
        """expert(chunk), in training on the chunk padded with zero rows to a multiple of ``ROW_BUCKET``.

        Slice sizes change every step; padded, they take a few sizes only, so the allocator reuses
        freed blocks and oneDNN its compiled kernels instead of growing with every new shape. An
        expert works on each token alone, so the padding changes no real row."""
        size = chunk.shape[0]
        padding = -size % ROW_BUCKET if self.training else 0
        if padding:
            chunk = torch.cat([chunk, chunk.new_zeros(padding, chunk.shape[1])])
            chunk_tokens = torch.cat([chunk_tokens, chunk_tokens.new_zeros(padding)])
        return expert(chunk[None], chunk_tokens[None])[0, :size]

    def dispatch_per_token(self, x: torch.Tensor, tokens: torch.Tensor, gates: torch.Tensor,
                           choices: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as ``dispatch``, one token and one choice at a time."""
        n, k = choices.shape
        kept = [[True] * k for _ in range(n)]
        if capacity:
            taken = [0] * self.n_choices
            for j in range(k):
                for t in range(n):
                    expert = int(choices[t, j])
                    kept[t][j] = taken[expert] < capacity
                    taken[expert] += 1
        rows = []
        for t in range(n):
            row = torch.zeros(x.shape[-1], device=x.device)
            for j in range(k):
                if kept[t][j] and int(choices[t, j]) < self.n_routed:
                    expert = self.routed[int(choices[t, j])]
                    row = row + gates[t, j] * expert(x[t][None, None], tokens[t][None, None])[0, 0]
            rows.append(row)
        return torch.stack(rows), torch.tensor(kept, device=x.device)

    def record_routing(self, probs: torch.Tensor, choices: torch.Tensor, kept: torch.Tensor) -> None:
        """Set ``expert_load`` and ``drop_fraction``; in training also the balance loss ``aux_loss``."""
        load = torch.bincount(choices.reshape(-1), minlength=self.n_choices).float() / choices.numel()
        self.expert_load = load.detach()
        self.drop_fraction = 1 - kept.float().mean()
        if self.training:
            loss = self.balance_coef * self.n_choices * (load * probs.mean(0)).sum()
            record_aux_loss(self, loss)
        else:
            self.aux_loss = None


def record_aux_loss(module: nn.Module, loss: torch.Tensor) -> None:
    """Set this call's auxiliary loss on ``module``, or add it to the sum over the calls of one forward
    when the layer stack shares the module between depths (``sums_over_calls``, reset by the stack)."""
    module.aux_loss = loss if module.aux_loss is None or not module.sums_over_calls else module.aux_loss + loss


def auxiliary_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the ``aux_loss`` that modules set during the last forward (0 when none did)."""
    return sum(m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None)


def routing_metrics(model: nn.Module) -> dict[str, float]:
    """Of the last forward: balance loss summed over MoE layers (0 in eval mode), expert load
    and dropped share averaged over them; {} for a model without MoE layers."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.expert_load is not None]
    if not layers:
        return {}
    mean = lambda values: sum(values) / len(layers)
    return {"moe_aux_loss": sum(float(m.aux_loss.detach()) for m in layers if m.aux_loss is not None),
            "moe_load_max": mean(float(m.expert_load.max()) for m in layers),
            "moe_load_min": mean(float(m.expert_load.min()) for m in layers),
            "moe_drop_fraction": mean(float(m.drop_fraction) for m in layers)}
