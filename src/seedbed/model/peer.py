"""PEER, a mixture of a million single-neuron experts found by product-key retrieval (He 2024).

The layer holds N = n^2 experts. Expert i is one hidden neuron: a down vector u_i and an
up vector v_i, rows of two (N, d) tables. H heads each retrieve k experts for every token x::

    q_h        = W_h x                                query of head h, key_dim wide (one linear for all heads)
    q_h        = [q1; q2]                             halves, key_dim / 2 each (RMS-normalised with query_norm)
    s1_a       = q1 . K1_{h,a},  s2_b = q2 . K2_{h,b}   a, b < n: head h's two sub-key tables
    A, B       = top_k(s1), top_k(s2)                 k sub-keys of each half
    S_h        = top_k { s1_a + s2_b : a in A, b in B }   k of the k^2 candidate sums
    i          = a * n + b                            the retrieved expert of each chosen pair
    g_h        = softmax over S_h of (s1_a + s2_b)    gates of head h, sum to 1
    y          = sum_h sum_{i in S_h} g_hi * act(u_i . x) * v_i

The score of expert i = a n + b is s1_a + s2_b, so the top k of the k^2 candidate sums
are exactly the top k of all N scores (an expert outside A x B is beaten by k candidates
inside it), found with O(n + k^2) work per head instead of O(N). ``reference=True`` scores
all N experts as q1 . K1[i // n] + q2 . K2[i % n] and takes the top k of those: a plain
(tokens x N) search for small N, beside the fast path, giving the same experts and output.

Choices. Each head has its own sub-keys K1, K2 (n x key_dim / 2), as each head of Lample's
product-key memory does, while all heads share the N experts: the keys are H n key_dim
parameters, small beside the experts' 2 N d. The query stays a dense float matrix whatever
the model's linear kind, as the MoE router does: it is small and chooses discretely. It gets
no BatchNorm (the paper's): batch statistics mix positions and break causality;
``query_norm`` RMS-normalises each half per token instead. Initialisation follows the MLP:
u_i like an up-projection row (std 1/sqrt(d), cut at 3 std), v_i zero (so the layer starts
at 0, like the MLP's zero down-projection), sub-keys of std 1/sqrt(key_dim / 2) so that a
normalised q1 . K1 starts at unit variance. The tables are parameters named ``*_embedding``
and read with ``F.embedding`` (a gather of the retrieved rows; its gradient is dense over the
table): the optimiser puts them on AdamW like the token embedding, where Muon would
orthogonalise an (N, d) table.

Memory: per token the layer keeps 2 H n sub-key scores, H k^2 candidates and the 2 H k
gathered rows of width d; nothing of size tokens x N (but in the reference). Each token's
retrieval reads only itself, so the layer is causal and steps like the parallel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.layers import BuildContext, initial_weight
from seedbed.model.mlp import ACTIVATIONS
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import FFNS, require


@FFNS.register("peer")
class PEER(nn.Module):
    @dataclass
    class Options:
        n_experts: int = 4096  # N, a perfect square n^2 (the paper: 1024^2)
        heads: int = 4  # H retrievals per token, each with its own query and sub-keys
        top_k: int = 8  # k experts per head, at most n = sqrt(n_experts)
        key_dim: int = 64  # width of each head's query, even: two halves of key_dim / 2
        activation: str = "gelu"  # of u_i . x: relu2 | leaky_relu2 | gelu | silu
        query_norm: bool = True  # RMS-normalise each query half per token (no gain)
        down_init_std: float = 0.0  # u_i; 0: 1/sqrt(d_model)
        up_init_std: float = 0.0  # v_i; 0: zeros, so the layer starts at 0
        key_init_std: float = 0.0  # sub-keys; 0: 1/sqrt(key_dim / 2)
        reference: bool = False  # score all N experts (tokens x N memory) instead of product keys

        def check(self, where: str) -> None:
            n = math.isqrt(max(self.n_experts, 0))
            require(self.n_experts >= 1 and n * n == self.n_experts,
                    f"{where}.n_experts must be a perfect square (n^2 experts), got {self.n_experts}")
            require(self.heads >= 1, f"{where}.heads must be >= 1, got {self.heads}")
            require(1 <= self.top_k <= n,
                    f"{where}.top_k must be between 1 and sqrt(n_experts)={n}, got {self.top_k}")
            require(self.key_dim >= 2 and self.key_dim % 2 == 0,
                    f"{where}.key_dim must be even and >= 2 (two halves), got {self.key_dim}")
            require(self.activation in ACTIVATIONS,
                    f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
            for key in ("down_init_std", "up_init_std", "key_init_std"):
                value = getattr(self, key)
                require(value >= 0, f"{where}.{key} must be >= 0, got {value}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d = ctx.d_model
        self.n = math.isqrt(options.n_experts)
        self.n_experts, self.heads, self.top_k = options.n_experts, options.heads, options.top_k
        self.key_dim, self.query_norm, self.reference = options.key_dim, options.query_norm, options.reference
        self.activation = ACTIVATIONS[options.activation]
        self.query = ctx.linear(d, options.heads * options.key_dim, spec={"kind": "dense"})
        half = options.key_dim // 2
        key_std = options.key_init_std or 1.0 / math.sqrt(half)
        # (H, 2, n, key_dim / 2): head h's K1 and K2.
        self.sub_key_embedding = nn.Parameter(torch.randn(options.heads, 2, self.n, half) * key_std)
        self.down_embedding = initial_weight(d, options.n_experts, options.down_init_std, zero_init=False)
        self.up_embedding = initial_weight(d, options.n_experts, options.up_init_std,
                                           zero_init=options.up_init_std == 0)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = self.sub_key_scores(flat)
        retrieve = self.retrieve_all if self.reference else self.retrieve
        expert_scores, experts = retrieve(scores)
        return self.experts_output(flat, expert_scores, experts).view(x.shape)

    def flops(self, batch: int, context: int) -> Flops:
        """Per token: the query, each head's two sub-key score rows (2 H (key_dim / 2) n), and the
        H k retrieved experts, u_i . x down and v_i up (2 d H k each way). The top-k selections, the
        k^2 candidate sums, the gathers and the gates are not matmul work, so not counted."""
        tokens, d, active = batch * context, self.down_embedding.shape[1], self.heads * self.top_k
        return (self.query.flops(tokens) + matmul_flops(tokens * self.heads, self.key_dim, self.n)
                + matmul_flops(tokens, d, active) + matmul_flops(tokens, active, d))

    def active_parameters(self) -> int:
        """Parameters one token's forward reads: the query, every sub-key, and 2 d per retrieved expert."""
        d = self.down_embedding.shape[1]
        query = sum(p.numel() for p in self.query.parameters())
        return query + self.sub_key_embedding.numel() + 2 * d * self.heads * self.top_k

    def sub_key_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(M, d) -> (M, H, 2, n): q1 . K1_a and q2 . K2_b for every head."""
        q = self.query(x).view(x.shape[0], self.heads, 2, self.key_dim // 2)
        if self.query_norm:
            q = F.rms_norm(q, (q.shape[-1],))
        return torch.einsum("mhcj,hcnj->mhcn", q, self.sub_key_embedding.to(q.dtype))

    def retrieve(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key search: (M, H, 2, n) sub-key scores -> (M, H, k) expert scores and indices."""
        k = self.top_k
        best, index = scores.topk(k, dim=-1)  # (M, H, 2, k)
        candidates = best[:, :, 0, :, None] + best[:, :, 1, None, :]  # (M, H, k, k): s1_a + s2_b
        expert_scores, pair = candidates.flatten(2).topk(k, dim=-1)  # (M, H, k) of the k^2
        a = index[:, :, 0].gather(-1, pair // k)
        b = index[:, :, 1].gather(-1, pair % k)
        return expert_scores, a * self.n + b

    def retrieve_all(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: the score of every expert i, s1[i // n] + s2[i % n], and the top k of all N."""
        i = torch.arange(self.n_experts, device=scores.device)
        every = scores[:, :, 0, i // self.n] + scores[:, :, 1, i % self.n]  # (M, H, N)
        return every.topk(self.top_k, dim=-1)

    def experts_output(self, x: torch.Tensor, expert_scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum over heads and retrieved experts of softmax gate * act(u_i . x) * v_i: (M, d)."""
        at_least_fp32 = torch.promote_types(expert_scores.dtype, torch.float32)
        gates = expert_scores.to(at_least_fp32).softmax(-1).to(x.dtype)  # (M, H, k)
        down = F.embedding(experts, self.down_embedding).to(x.dtype)  # (M, H, k, d)
        up = F.embedding(experts, self.up_embedding).to(x.dtype)
        hidden = self.activation(torch.einsum("mhkd,md->mhk", down, x))
        return torch.einsum("mhk,mhkd->md", gates * hidden, up)
