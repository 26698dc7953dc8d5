"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): a selective state space layer computed by state space duality.

The layer, on inputs u_t (d_model), with d_inner = expand * d_model split into H heads of P = head_dim
channels, and G groups of heads sharing their B and C (head h reads group h // (H / G)):

    [z, x', B', C', dt'] = W_in u_t                      (d_inner, d_inner, G N, G N, H)
    [x, B, C] = silu(causal_conv([x', B', C']))         depthwise, kernel K, with bias
    dt = softplus(dt' + dt_bias),  A = -exp(A_log)       one step size per head and position, one decay per head
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T           the state of each head, N x P
    y_t = C_t^T h_t + D x_t                              D a per-head skip
    out_t = W_out RMSNorm(y_t * silu(z_t))               the norm after the gate, as in Mamba-2

Three forms compute the same y from a carried-in state and return the state after the last position;
the skip D x_t is added outside them. With log decays a_t = dt_t A (<= 0) and segment sums
s(i, j) = a_{j+1} + ... + a_i for j <= i (s(i, i) = 0):

- sequential (the reference, and for one position the recurrent step of decoding): the recurrence
  above, one position at a time.
- chunked: positions split into chunks of L; within a chunk, with local indices i, j, the state S
  entering it, and X = dt x:

      Y   = (C B^T ⊙ exp(s)) X  +  exp(a_0 + ... + a_i) C_i^T S      exp(s) is 0 above the diagonal
      S_c = sum_j exp(s(L - 1, j)) B_j X_j^T                        the chunk's own share of its last state

  The state entering chunk c + 1 is exp(sum of chunk c's a) times the one entering c, plus S_c, so
  with N_c chunks all N_c + 1 entering states (the last is the final state) are one lower-triangular
  (N_c + 1) x (N_c + 1) matrix exp(segment sums of the chunk totals) times [S_in, S_0, ..., S_{N_c-1}]:
  a matmul, no loop.
  That is the paper's SSD algorithm; C B^T is formed once per group and shared by its heads.
- recurrent step: one position of the sequential form, plus rolling the convolution's window; the
  decode state is the last K - 1 convolution inputs and the H (N x P) states, whatever the length.

Segment sums. Every decay is exp of a segment sum (<= 0) or of -inf, never of a positive number.
They are summed directly (a masked cumulative sum of the a_k themselves), not as the difference
cumsum(a)_i - cumsum(a)_j: over 4096 positions with dt A = -16 that running sum reaches -65536,
where float32's spacing is 0.008, so a short segment's decay would lose its precision.

Choices:
- Group norm: RMS over each group's d_inner / G channels (Mamba-2's grouped RMSNormGated), with one
  gain of that size shared by the groups (``ctx.norm`` builds norms of one size, as retention's
  per-head group norm); with the default G = 1 it is Mamba-2's norm over d_inner.
- The convolution is K shifted multiply-adds, not ``F.conv1d``: it is elementwise work per channel
  (perf.py counts none), and FlopCounterMode's formula for the grouped convolution's weight gradient
  ignores the groups and counts channels^2 times too much. Its weight keeps nn.Conv1d's
  (channels, 1, K) layout: 3-D, so Muon (2-D hidden matrices) leaves it to AdamW.
- Float32 from the convolution to the norm, autocast disabled, state included, also under bf16
  autocast: the decays multiply up over thousands of positions, and every form then agrees to
  float32 rounding. Only the two projections run under autocast.
- Padding the last chunk uses dt = 0 (decay 1, no input), so it cannot change the final state.
- Initialisation as Mamba-2: dt log-uniform in [dt_min, dt_max] through dt_bias = softplus^-1(dt),
  A_log = log(uniform[1, 16]), D = 1, convolution weights and bias uniform in +-1/sqrt(K)
  (nn.Conv1d's default), output projection zero.
- ``max_len`` in ``init_state`` is accepted for the shared interface but unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.layers import BuildContext
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import MIXERS, require

FORMS = ("chunked", "sequential")
A_INIT_RANGE = (1.0, 16.0)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """s[..., i, j] = a[..., j + 1] + ... + a[..., i] for j <= i (0 on the diagonal), -inf above it."""
    n = a.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool, device=a.device)
    terms = torch.where(ones.tril(-1), a[..., :, None], 0.0)  # terms[k, j] = a_k for k > j
    return torch.where(ones.tril(), terms.cumsum(-2), float("-inf"))


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One position: x (b, H, P), dt (b, H), A (H,), B and C (b, G, N), state (b, H, N, P) -> y (b, H, P), state."""
    per_group = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(per_group, 1), C.repeat_interleave(per_group, 1)
    state = (dt * A).exp()[..., None, None] * state + (dt[..., None] * B)[..., :, None] * x[..., None, :]
    return (C[..., None, :] @ state)[..., 0, :], state


def sequential_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one position at a time: x (b, T, H, P), dt (b, T, H), B and C (b, T, G, N), state (b, H, N, P)."""
    outputs = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def chunked_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD chunked form, chunks of ``chunk_size`` positions (shapes as ``sequential_ssd``)."""
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2:]
    size = min(chunk_size, length)
    n_chunks = math.ceil(length / size)
    pad = n_chunks * size - length  # zero dt, x, B, C: decay 1 and no input

    def to_chunks(t: torch.Tensor) -> torch.Tensor:
        """(b, T, H or G, d) -> (b, G, H / G or 1, chunks, L, d): heads grouped under the B and C they share."""
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
        return t.view(batch, n_chunks, size, groups, -1, t.shape[-1]).permute(0, 3, 4, 1, 2, 5)

    X = to_chunks(x * dt[..., None])  # (b, G, H/G, N_c, L, P)
    Bc, Cc = to_chunks(B), to_chunks(C)  # (b, G, 1, N_c, L, N)
    a = to_chunks((dt * A)[..., None])[..., 0]  # (b, G, H/G, N_c, L)
    decay = segsum(a).exp()  # decay[i, j]: from after position j through position i; 0 for j > i
    inner = ((Cc @ Bc.transpose(-1, -2)) * decay) @ X
    own = Bc.transpose(-1, -2) @ (X * decay[..., -1, :, None])  # (b, G, H/G, N_c, N, P)

    # States entering each chunk, and (row N_c) after the last one, from the carried-in state and the chunks' own.
    from_entry = a.cumsum(-1)  # log decay from the chunk's entering state through position i
    across = segsum(F.pad(from_entry[..., -1], (1, 0))).exp()  # (b, G, H/G, N_c + 1, N_c + 1)
    sources = torch.cat([state.reshape(batch, groups, -1, 1, d_state, head_dim), own], dim=3)
    entering = (across @ sources.flatten(-2)).unflatten(-1, (d_state, head_dim))

    cross = (Cc @ entering[:, :, :, :n_chunks]) * from_entry.exp()[..., None]
    y = (inner + cross).permute(0, 3, 4, 1, 2, 5).reshape(batch, n_chunks * size, heads, head_dim)
    final = entering[:, :, :, n_chunks].contiguous()  # its own storage, not all N_c + 1 entering states
    return y[:, :length], final.view(batch, heads, d_state, head_dim)


def causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution, (b, K - 1 + T, channels) -> (b, T, channels):
    out[t, c] = bias[c] + sum_k weight[c, 0, k] window[t + k, c]."""
    kernel = weight.shape[-1]
    length = window.shape[1] - kernel + 1
    out = bias
    for k in range(kernel):
        out = torch.addcmul(out, weight[:, 0, k], window[:, k:k + length])
    return out


@MIXERS.register("mamba2")
class Mamba2(nn.Module):
    @dataclass
    class Options:
        d_state: int = 16  # N
        head_dim: int = 16  # P
        expand: int = 2  # d_inner = expand * d_model
        n_groups: int = 1  # G: heads in a group share B and C
        conv_kernel: int = 4  # K
        chunk_size: int = 64  # positions per chunk in the chunked form and in a prefill step
        dt_min: float = 0.001
        dt_max: float = 0.1
        form: str = "chunked"  # chunked | sequential: what forward uses

        def check(self, where: str) -> None:
            for name in ("d_state", "head_dim", "expand", "n_groups", "conv_kernel", "chunk_size"):
                value = getattr(self, name)
                require(value > 0, f"{where}.{name} must be positive, got {value}")
            require(0 < self.dt_min <= self.dt_max,
                    f"{where}: need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
            require(self.form in FORMS, f"{where}.form must be one of {', '.join(FORMS)}, got {self.form!r}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d_inner = options.expand * ctx.d_model
        require(d_inner % options.head_dim == 0, f"{ctx.where}.head_dim={options.head_dim} does not divide "
                f"d_inner = expand * d_model = {d_inner}")
        n_heads = d_inner // options.head_dim
        require(n_heads % options.n_groups == 0,
                f"{ctx.where}.n_groups={options.n_groups} does not divide the {n_heads} heads")
        self.d_inner, self.n_heads, self.head_dim = d_inner, n_heads, options.head_dim
        self.n_groups, self.d_state, self.kernel = options.n_groups, options.d_state, options.conv_kernel
        self.form, self.chunk_size = options.form, options.chunk_size
        self.conv_dim = d_inner + 2 * self.n_groups * self.d_state  # x, B and C go through the convolution

        self.in_proj = ctx.linear(ctx.d_model, d_inner + self.conv_dim + n_heads)
        bound = self.kernel ** -0.5
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound))
        dt = torch.empty(n_heads).uniform_(math.log(options.dt_min), math.log(options.dt_max)).exp()
        self.dt_bias = nn.Parameter(dt.expm1().log())  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(*A_INIT_RANGE).log())
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = ctx.norm(d_inner // self.n_groups)
        self.out = ctx.linear(d_inner, ctx.d_model, zero_init=True)

    def mix(self, u: torch.Tensor, form: str, state: dict) -> torch.Tensor:
        """The layer on u (b, T, d_model) from ``state``, which it advances in place."""
        b, t, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        with torch.autocast(u.device.type, enabled=False):
            window = torch.cat([state["conv"], xbc.float()], dim=1)
            state["conv"] = window[:, t:].clone()  # the last K - 1 inputs, without keeping the whole window
            xbc = F.silu(causal_conv(window, self.conv_weight.float(), self.conv_bias.float()))
            x, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
            x = x.view(b, t, self.n_heads, self.head_dim)
            B, C = B.view(b, t, self.n_groups, self.d_state), C.view(b, t, self.n_groups, self.d_state)
            dt = F.softplus(dt.float() + self.dt_bias.float())
            A = -self.A_log.float().exp()
            if form == "chunked":
                y, state["ssm"] = chunked_ssd(x, dt, A, B, C, state["ssm"], self.chunk_size)
            else:
                y, state["ssm"] = sequential_ssd(x, dt, A, B, C, state["ssm"])
            y = y + self.D.float()[:, None] * x
            gated = y.reshape(b, t, self.n_groups, -1) * F.silu(z.float()).view(b, t, self.n_groups, -1)
            normed = self.norm(gated).flatten(2)
        return self.out(normed.to(z.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.form, self.init_state(x.shape[0], x.shape[1], x.device, x.dtype))

    def flops(self, batch: int, context: int) -> Flops:
        """The two projections, plus per head the products of ``forward``'s form (the convolution, gate and
        norm are elementwise). With T positions, chunks of L = min(chunk_size, T), N_c = ceil(T / L)::

            sequential: C_t^T h_t for every t (T, N, P); the state update is an outer product, elementwise
            chunked:    per chunk and group C B^T (L, N, L); per chunk and head (.) X (L, L, P), the chunk's
                        state B^T X (N, L, P), C S (L, N, P); the entering states (N_c + 1, N_c + 1, N P)

        Every operand depends on the input, so each product takes both gradients.
        """
        tokens, t, n, p = batch * context, context, self.d_state, self.head_dim
        projections = self.in_proj.flops(tokens) + self.out.flops(tokens)
        if self.form == "sequential":
            return projections + batch * self.n_heads * matmul_flops(t, n, p)
        size = min(self.chunk_size, t)
        n_chunks = math.ceil(t / size)
        per_head = (n_chunks * (matmul_flops(size, size, p) + matmul_flops(n, size, p) + matmul_flops(size, n, p))
                    + matmul_flops(n_chunks + 1, n_chunks + 1, n * p))
        per_group = n_chunks * matmul_flops(size, n, size)
        return projections + batch * (self.n_heads * per_head + self.n_groups * per_group)

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> dict:
        # Float32 whatever the model dtype, as the core runs in float32.
        return {"conv": torch.zeros(batch, self.kernel - 1, self.conv_dim, device=device),
                "ssm": torch.zeros(batch, self.n_heads, self.d_state, self.head_dim, device=device)}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Extend by x.shape[1] positions: the recurrent step for one, the chunked form for a prefill."""
        return self.mix(x, "sequential" if x.shape[1] == 1 else "chunked", state), state
