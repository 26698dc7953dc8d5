"""Multi-channel attention: s attention + MLP blocks side by side on the same stream, merged.

Each channel is an expert reading the same sequence with its own queries, keys and values
(efficient_transformer_v1). The mixer reads the raw residual stream h (``reads_residual``:
the layer adds no norm before it) and returns the delta the layer adds, h <- h + delta::

    for channel i = 1..s:
        a_i = Attention_i(norm_a_i(h))                       own q, k, v, out; heads, rotary, qk-norm
        u_i = norm_m_i(h + a_i)
        m_i = MLP_i(u_i)  [+ MLP_shared(u_i)]                shared_fraction > 0: one MLP for all channels
        y_i = a_i + m_i                                      channel i's block output is h + y_i

    delta = sum_i w_i y_i                                    merge = "softmax": w = softmax_i(score . y_i)
          = sum_i w_i (h + y_i) - h                          (sum w = 1: the convex combination of the blocks)
    delta = mean_i y_i                                       merge = "mean"
    delta = max_i y_i, elementwise                           merge = "max"

``score`` is a learned d-vector that starts at zero, so the softmax merge starts as the mean
(SoftMoE-like weights computed from the features themselves). With s = 1 the block is a plain
pre-norm attention + MLP block.

Widths. A vanilla MLP has mlp_mult * d hidden units; each channel gets
hidden = round(width_mult * mlp_mult * d / s). With shared_fraction f, round((1 - f) * hidden)
of them are the channel's own and round(f * hidden) sit in one MLP that every channel calls
(DeepSeekMoE's shared expert: a space for what the channels have in common), stored once, its
gradient the sum over the channels.

Cost. The channels run one after the other (s attention calls and s own-MLP calls); the
shared MLP runs once on all channels' inputs stacked. Decoding keeps one KV cache per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seedbed.model.attention import Attention
from seedbed.model.layers import BuildContext
from seedbed.model.mlp import ACTIVATIONS, MLP
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import MIXERS, require

MERGES = ("softmax", "mean", "max")


def mlp_of_width(hidden: int, activation: str, ctx: BuildContext) -> MLP:
    """An MLP with exactly ``hidden`` hidden units (MLP takes a multiple of d_model and rounds it)."""
    mult = hidden / ctx.d_model
    assert max(1, round(mult * ctx.d_model)) == hidden, (hidden, ctx.d_model)
    return MLP(MLP.Options(mult=mult, activation=activation), ctx)


@MIXERS.register("multichannel")
class MultiChannelAttention(nn.Module):
    reads_residual = True  # gets h itself, not norm(h): each channel has its own norms and residual

    @dataclass
    class Options:
        channels: int = 2  # s
        n_heads: int = 4  # per channel
        n_kv_heads: int = 0  # 0: same as n_heads
        qk_norm: bool = True
        rope_base: float = 10000.0
        mlp_mult: float = 4.0  # a vanilla MLP's hidden width / d_model
        width_mult: float = 1.0  # each channel's hidden width = width_mult * mlp_mult * d_model / channels
        shared_fraction: float = 0.0  # this fraction of each channel's hidden width is one MLP shared by all
        activation: str = "relu2"
        merge: str = "softmax"  # softmax | mean | max

        def check(self, where: str) -> None:
            require(self.channels >= 1, f"{where}.channels must be >= 1, got {self.channels}")
            require(self.n_heads > 0, f"{where}.n_heads must be positive, got {self.n_heads}")
            require(self.n_kv_heads >= 0, f"{where}.n_kv_heads must be >= 0, got {self.n_kv_heads}")
            require(self.rope_base > 0, f"{where}.rope_base must be positive, got {self.rope_base}")
            require(self.mlp_mult > 0, f"{where}.mlp_mult must be positive, got {self.mlp_mult}")
            require(self.width_mult > 0, f"{where}.width_mult must be positive, got {self.width_mult}")
            require(0 <= self.shared_fraction < 1,
                    f"{where}.shared_fraction must be in [0, 1), got {self.shared_fraction}")
            require(self.activation in ACTIVATIONS,
                    f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
            require(self.merge in MERGES, f"{where}.merge must be one of {', '.join(MERGES)}, got {self.merge!r}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d, s = ctx.d_model, options.channels
        self.channels, self.merge_mode = s, options.merge
        hidden = round(options.width_mult * options.mlp_mult * d / s)
        shared = round(options.shared_fraction * hidden)
        own = round((1 - options.shared_fraction) * hidden)
        require(own >= 1, f"{ctx.where}: each channel's MLP would have {own} hidden units "
                          f"(width_mult * mlp_mult * d_model / channels, less the shared_fraction); make it wider")
        require(options.shared_fraction == 0 or shared >= 1,
                f"{ctx.where}.shared_fraction={options.shared_fraction} leaves the shared MLP no hidden unit "
                f"of the {hidden} per channel")
        self.own_hidden, self.shared_hidden = own, shared if options.shared_fraction > 0 else 0
        attention = Attention.Options(n_heads=options.n_heads, n_kv_heads=options.n_kv_heads,
                                      qk_norm=options.qk_norm, rope_base=options.rope_base)
        self.attentions = nn.ModuleList(Attention(attention, ctx) for _ in range(s))
        self.attention_norms = nn.ModuleList(ctx.norm(d) for _ in range(s))
        self.mlp_norms = nn.ModuleList(ctx.norm(d) for _ in range(s))
        self.mlps = nn.ModuleList(mlp_of_width(own, options.activation, ctx) for _ in range(s))
        self.shared_mlp = mlp_of_width(shared, options.activation, ctx) if self.shared_hidden else None
        # Only the softmax merge reads it: the other merges would leave a parameter without a gradient.
        self.score = nn.Parameter(torch.zeros(d)) if options.merge == "softmax" else None

    def channel_outputs(self, h: torch.Tensor, state: list[dict] | None = None) -> torch.Tensor:
        """y_i = a_i + m_i of every channel, stacked (B, T, s, d). With ``state`` (one attention cache
        per channel) the attentions extend their caches instead of reading h as a whole sequence."""
        attended = []
        for i, (norm, attention) in enumerate(zip(self.attention_norms, self.attentions)):
            x = norm(h)
            attended.append(attention(x) if state is None else attention.step(x, state[i])[0])
        a = torch.stack(attended, dim=-2)
        u = torch.stack([norm(h + a_i) for norm, a_i in zip(self.mlp_norms, attended)], dim=-2)
        m = torch.stack([mlp(u[..., i, :], None) for i, mlp in enumerate(self.mlps)], dim=-2)
        if self.shared_mlp is not None:
            m = m + self.shared_mlp(u, None)  # one call on every channel's input
        return a + m

    def merge_weights(self, y: torch.Tensor) -> torch.Tensor:
        """The softmax merge's w (B, T, s) for channel outputs y (B, T, s, d): non-negative, summing to 1."""
        logits = (y @ self.score.to(y.dtype)[:, None]).squeeze(-1)  # a (.., d) @ (d, 1) matmul, as counted
        return logits.float().softmax(dim=-1).to(y.dtype)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, s, d) -> (B, T, d)."""
        if self.merge_mode == "max":
            return y.amax(dim=-2)
        if self.merge_mode == "mean":
            return y.mean(dim=-2)
        return (self.merge_weights(y).unsqueeze(-1) * y).sum(dim=-2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.merge(self.channel_outputs(h))

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
        return [attention.init_state(batch, max_len, device, dtype) for attention in self.attentions]

    def step(self, h: torch.Tensor, state: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        return self.merge(self.channel_outputs(h, state)), state

    def flops(self, batch: int, context: int) -> Flops:
        """Every channel's attention and own MLP, the shared MLP once over the s channels' inputs
        (s * tokens), and the softmax merge's score, a (s * tokens, d) @ (d,) product."""
        total = sum((part.flops(batch, context) for part in (*self.attentions, *self.mlps)), Flops())
        if self.shared_mlp is not None:
            total = total + self.shared_mlp.flops(batch * self.channels, context)
        if self.score is not None:
            total = total + matmul_flops(batch * context * self.channels, self.score.numel(), 1)
        return total
