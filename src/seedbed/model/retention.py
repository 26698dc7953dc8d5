"""Multi-scale retention (RetNet): attention without softmax, with a per-head exponential decay.

Each head h has a fixed decay gamma in (0, 1). With rotary-rotated, 1/sqrt(d_k)-scaled
queries q_n and keys k_n and values v_n, retention at position n is

    o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m

and the layer is ``W_o( groupnorm(o) * swish(W_g x) )``, the group norm taken over each
head's d_v outputs. Three forms compute the same o:

- parallel:   O = (Q K^T ⊙ D) V, with D[n, m] = gamma^(n - m) for n >= m else 0.
- recurrent:  S_n = gamma S_{n-1} + k_n^T v_n (a d_k x d_v matrix), o_n = q_n S_n.
- chunkwise:  for a chunk of L positions starting at s, with local indices i, j,
                  o_{s+i} = sum_{j <= i} gamma^(i - j) (q_i . k_j) v_j  +  gamma^(i + 1) q_i S_{s-1}
                  S_{s+L-1} = gamma^L S_{s-1} + sum_j gamma^(L - 1 - j) k_j^T v_j
              The state entering every chunk (and the final one) is a decay-weighted sum of
              the chunks before it, so all chunks are computed at once, without a loop,
              holding T / C + 1 states.

All three take a carried-in state and return the state after their last position, so
``step`` can extend a sequence by one position (recurrent) or by a prefill of any length
(chunkwise); memory is the (B, H, d_k, d_v) state whatever the context length.

Normalisation. The paper's parallel form scales the rows of D by 1/sqrt(sum_m D[n, m]) and
divides each row of Q K^T ⊙ D by max(|row sum|, 1); the recurrent and chunkwise forms then
need their own bookkeeping of those row sums, and the clamp at 1 is where implementations
stop agreeing. Both are a positive scalar per (position, head), which the per-head group
norm removes anyway (RMSNorm(c y) = RMSNorm(y) for c > 0, up to its eps). So no
normalisation is applied before the group norm: every form computes the same plain sum,
and the forms agree to float rounding. The cost is magnitude: |o_n| can grow like
1 / (1 - gamma) (4096 for gamma = 1 - 2^-12), harmless in float32, which is why
the retention core and its state always run in float32, also under bf16 autocast.

Decay powers. Every power has a non-negative exponent (a later position minus an earlier
one) and is computed as exp(distance * log gamma), with log gamma = log1p(-2^-e) taken in
float64. The shortcut q_n gamma^n, k_m gamma^-m is never used: for gamma = 1 - 2^-5,
gamma^-3000 is about e^95, past the float32 range.

Choices:
- Decays follow RetNet's multi-scale rule gamma_h = 1 - 2^(-5 - h). Beyond 8 heads its
  slowest heads would remember ~2^(4 + H) positions, far past any context here (and
  gamma rounds to 1 in float32 from H = 20), so for H > 8 the exponents are spread
  evenly over [5, 12] instead, the range the rule covers at H = 8 (both rules agree there).
- Positions are plain rotary (``rotary_tables``/``apply_rotary`` from attention.py),
  without xPos's extra per-dimension scaling zeta^n / zeta^-m: that scaling is an
  exponential in absolute position with the same overflow problem as gamma^-n, and the
  decay already supplies the distance attenuation xPos was added for.
- q is scaled by 1/sqrt(d_k) as in RetNet. Without a softmax, and with the group norm
  after it, that constant changes only the magnitude of o (kept in range), not the output.
- ``max_len`` in ``init_state`` is accepted for the shared interface but unused: rotary
  angles are computed for the new positions as they come, and nothing is preallocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.attention import apply_rotary, rotary_tables
from seedbed.model.layers import BuildContext
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import MIXERS, require

FORMS = ("chunkwise", "parallel", "recurrent")
GATES = {"swish": F.silu, "gelu": F.gelu}


def decay_exponents(n_heads: int) -> list[float]:
    """e_h with gamma_h = 1 - 2^-e_h: 5, 6, ..., 4 + H up to 8 heads, else evenly over [5, 12]."""
    if n_heads <= 8:
        return [5.0 + h for h in range(n_heads)]
    return [5.0 + 7.0 * h / (n_heads - 1) for h in range(n_heads)]


def decay_powers(log_decay: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """gamma_h^distance for every head, shape (H, *distance.shape); 0 where distance < 0."""
    exponent = distance.to(torch.float32) * log_decay.view(-1, *([1] * distance.dim()))
    return exponent.masked_fill(distance < 0, float("-inf")).exp()


def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q K^T ⊙ D) V plus the carried-in state's share; returns (output, state after the last position).

    q, k are (B, H, T, d_k), v is (B, H, T, d_v), state is (B, H, d_k, d_v), log_decay is (H,).
    """
    length = q.shape[2]
    position = torch.arange(length, device=q.device)
    decay = decay_powers(log_decay, position[:, None] - position[None, :])
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    # The state carried in is decayed once more at every position, gamma^(n + 1) at position n.
    out = out + (q * decay_powers(log_decay, position + 1)[..., None]) @ state
    to_end = decay_powers(log_decay, length - 1 - position)[..., None]
    carried = decay_powers(log_decay, torch.tensor(length, device=q.device))[..., None, None] * state
    new_state = carried + (k * to_end).transpose(-1, -2) @ v
    return out, new_state


def recurrent_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n, one position at a time (shapes as the parallel form)."""
    decay = log_decay.exp()[:, None, None]
    outputs = []
    for n in range(q.shape[2]):
        state = decay * state + k[:, :, n, :, None] * v[:, :, n, None, :]
        outputs.append(q[:, :, n, None, :] @ state)
    return torch.cat(outputs, dim=2), state


def chunkwise_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel inside chunks of ``chunk_size`` positions, decayed states across them (shapes as above)."""
    batch, heads, length, _ = q.shape
    size = min(chunk_size, length)
    n_chunks = math.ceil(length / size)
    pad = n_chunks * size - length  # zero keys and values at the end add nothing to any state

    def chunked(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 0, 0, pad)) if pad else x  # F.pad copies even when it pads nothing
        return padded.reshape(batch, heads, n_chunks, size, x.shape[-1])

    qc, kc, vc = chunked(q), chunked(k), chunked(v)
    local = torch.arange(size, device=q.device)
    inner = ((qc @ kc.transpose(-1, -2)) * decay_powers(log_decay, local[:, None] - local[None, :])[:, None]) @ vc

    # Each chunk's own contribution to the state at its last real position...
    starts = torch.arange(n_chunks, device=q.device) * size
    ends = torch.clamp(starts + size, max=length) - 1
    to_end = decay_powers(log_decay, ends[:, None] - starts[:, None] - local[None, :])  # (H, N, C)
    contribution = (kc * to_end[..., None]).transpose(-1, -2) @ vc  # (B, H, N, d_k, d_v)
    # ...and the state entering chunk s (s = N: after the last position) sums the chunks that end before it.
    entry = torch.cat([starts, torch.tensor([length], device=q.device)])
    across = decay_powers(log_decay, entry[:, None] - 1 - ends[None, :])  # (H, N + 1, N), zero unless chunk ended
    entering = torch.einsum("hsc,bhckv->bhskv", across, contribution)
    entering = entering + decay_powers(log_decay, entry)[..., None, None] * state[:, :, None]

    cross = (qc * decay_powers(log_decay, local + 1)[:, None, :, None]) @ entering[:, :, :n_chunks]
    out = (inner + cross).reshape(batch, heads, n_chunks * size, -1)[:, :, :length]
    return out, entering[:, :, n_chunks]


@MIXERS.register("retention")
class Retention(nn.Module):
    @dataclass
    class Options:
        n_heads: int = 4
        chunk_size: int = 64  # positions per chunk in the chunkwise form and in a prefill step
        form: str = "chunkwise"  # chunkwise | parallel | recurrent: what forward uses
        value_factor: float = 1.0  # value (and gate) width = value_factor * d_model
        gate: str = "swish"  # swish | gelu
        rope_base: float = 10000.0

        def check(self, where: str) -> None:
            require(self.n_heads > 0, f"{where}.n_heads must be positive, got {self.n_heads}")
            require(self.chunk_size > 0, f"{where}.chunk_size must be positive, got {self.chunk_size}")
            require(self.form in FORMS, f"{where}.form must be one of {', '.join(FORMS)}, got {self.form!r}")
            require(self.value_factor > 0, f"{where}.value_factor must be positive, got {self.value_factor}")
            require(self.gate in GATES, f"{where}.gate must be one of {', '.join(GATES)}, got {self.gate!r}")
            require(self.rope_base > 0, f"{where}.rope_base must be positive, got {self.rope_base}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d_model, n_heads = ctx.d_model, options.n_heads
        require(d_model % n_heads == 0, f"{ctx.where}.n_heads={n_heads} does not divide model.d_model={d_model}")
        self.n_heads, self.key_dim = n_heads, d_model // n_heads
        require(self.key_dim % 2 == 0, f"head size {self.key_dim} must be even for rotary positions")
        value_dim = options.value_factor * self.key_dim
        require(value_dim == int(value_dim),
                f"{ctx.where}.value_factor={options.value_factor} times head size {self.key_dim} is not a whole number")
        self.value_dim = int(value_dim)
        self.form, self.chunk_size, self.rope_base = options.form, options.chunk_size, options.rope_base
        # Plain floats, not a buffer: casting the model to bf16 must not round log(gamma).
        self.log_decays = [math.log1p(-2.0 ** -e) for e in decay_exponents(n_heads)]
        self.q = ctx.linear(d_model, n_heads * self.key_dim)
        self.k = ctx.linear(d_model, n_heads * self.key_dim)
        self.v = ctx.linear(d_model, n_heads * self.value_dim)
        self.gate = ctx.linear(d_model, n_heads * self.value_dim)
        self.gate_activation = GATES[options.gate]
        self.group_norm = ctx.norm(self.value_dim)
        self.out = ctx.linear(n_heads * self.value_dim, d_model, zero_init=True)

    def project(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 q, k (B, H, T, d_k), rotated to positions offset.., q scaled by 1/sqrt(d_k); v (B, H, T, d_v)."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.key_dim).transpose(1, 2).float()
        k = self.k(x).view(b, t, self.n_heads, self.key_dim).transpose(1, 2).float()
        v = self.v(x).view(b, t, self.n_heads, self.value_dim).transpose(1, 2).float()
        cos, sin = rotary_tables(torch.arange(offset, offset + t, device=x.device), self.key_dim, self.rope_base)
        return apply_rotary(q, cos, sin) * self.key_dim ** -0.5, apply_rotary(k, cos, sin), v

    def retain(self, form: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-normed retention output (B, T, H * d_v) and the new state, all in float32."""
        log_decay = torch.tensor(self.log_decays, dtype=torch.float32, device=q.device)
        with torch.autocast(q.device.type, enabled=False):
            if form == "parallel":
                out, state = parallel_retention(q, k, v, log_decay, state)
            elif form == "recurrent":
                out, state = recurrent_retention(q, k, v, log_decay, state)
            else:
                out, state = chunkwise_retention(q, k, v, log_decay, state, self.chunk_size)
            normed = self.group_norm(out.transpose(1, 2))
        return normed.flatten(2), state

    def finish(self, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        gate = self.gate_activation(self.gate(x))
        return self.out(normed.to(gate.dtype) * gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, 0)
        normed, _ = self.retain(self.form, q, k, v, self.zero_state(x.shape[0], x.device))
        return self.finish(x, normed)

    def flops(self, batch: int, context: int) -> Flops:
        """q, k, v, gate and out projections, plus per head the products of ``forward``'s form (no softmax,
        no score term of attention's; state zero and the final state unused, so its products get fewer
        gradients). With T positions, chunks of C = min(chunk_size, T), N = ceil(T / C)::

            parallel:   Q K^T (T, d_k, T), (.) V (T, T, d_v); q S (T, d_k, d_v; S constant), K^T V (unused)
            recurrent:  q_n S_n for every n (T, d_k, d_v); the state update is elementwise
            chunkwise:  per chunk Q K^T (C, d_k, C), (.) V (C, C, d_v), K^T V (d_k, C, d_v), q S (C, d_k, d_v);
                        the states across chunks (N + 1, N, d_k d_v), the decay matrix constant
        """
        tokens, t, dk, dv = batch * context, context, self.key_dim, self.value_dim
        projections = sum((linear.flops(tokens) for linear in (self.q, self.k, self.v, self.gate, self.out)), Flops())
        if self.form == "parallel":
            core = (matmul_flops(t, dk, t) + matmul_flops(t, t, dv) + matmul_flops(t, dk, dv, grads=1)
                    + matmul_flops(dk, t, dv, grads=0))
        elif self.form == "recurrent":
            core = matmul_flops(t, dk, dv)
        else:
            size = min(self.chunk_size, t)
            n_chunks = math.ceil(t / size)
            per_chunk = (matmul_flops(size, dk, size) + matmul_flops(size, size, dv) + matmul_flops(dk, size, dv)
                         + matmul_flops(size, dk, dv))
            core = n_chunks * per_chunk + matmul_flops(n_chunks + 1, n_chunks, dk * dv, grads=1)
        return projections + batch * self.n_heads * core

    def zero_state(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch, self.n_heads, self.key_dim, self.value_dim, device=device)

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> dict:
        # Float32 whatever the model dtype: the state sums up to ~1/(1 - gamma) terms.
        return {"state": self.zero_state(batch, device), "pos": 0}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Extend by x.shape[1] positions: the recurrence for one, the chunkwise form for a prefill."""
        pos, t = state["pos"], x.shape[1]
        q, k, v = self.project(x, pos)
        normed, state["state"] = self.retain("recurrent" if t == 1 else "chunkwise", q, k, v, state["state"])
        state["pos"] = pos + t
        return self.finish(x, normed), state
