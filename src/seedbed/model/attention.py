"""Causal self-attention: grouped-query heads, rotary positions, optional QK-norm.

The fast path is PyTorch's ``scaled_dot_product_attention``; ``reference_attention``
beside it is the plain softmax(QK^T / sqrt(d)) V with an explicit mask, and a test
checks the two agree. With grouped-query attention (fewer key/value heads than query
heads) SDPA shares each key/value head across its group natively (``enable_gqa``, torch
>= 2.5) instead of copying it per query head. Incremental decoding keeps a key/value cache
preallocated to ``max_len`` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.layers import BuildContext
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import MIXERS, require


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim / 2) for the given integer positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) by the position's angle; x is (B, H, T, d)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def expand_heads(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, n_heads, T, d): each key/value head serves n_heads / Hkv query heads."""
    groups = n_heads // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, in float32.

    q is (B, H, Tq, d) at positions offset..offset+Tq-1; k, v are (B, Hkv, Tk, d) at 0..Tk-1,
    Hkv dividing H (query head h reads key/value head h // (H / Hkv)).
    """
    k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    q_pos = torch.arange(offset, offset + q.shape[2], device=q.device)[:, None]
    k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """The same as ``reference_attention`` through the fused SDPA kernel."""
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            k, v = expand_heads(k, q.shape[1]), expand_heads(v, q.shape[1])
    if offset == 0 and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    q_pos = torch.arange(offset, offset + q.shape[2], device=q.device)[:, None]
    k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, **gqa)


def attention_flops(queries: int, keys: int, head_dim: int, fused: bool = True) -> Flops:
    """softmax(Q K^T) V of one head, over every query-key pair (masks are not discounted); through
    SDPA (``fused``), whose backward recomputes Q K^T, the backward costs 2.5x the forward."""
    total = matmul_flops(queries, head_dim, keys) + matmul_flops(queries, keys, head_dim)
    return total + Flops(backward=2 * queries * head_dim * keys) if fused else total


@MIXERS.register("attention")
class Attention(nn.Module):
    @dataclass
    class Options:
        n_heads: int = 4
        n_kv_heads: int = 0  # 0: same as n_heads; fewer gives grouped-query attention
        qk_norm: bool = True
        rope_base: float = 10000.0
        reference: bool = False  # use the plain attention instead of SDPA (for tests)

        def check(self, where: str) -> None:
            require(self.n_heads > 0, f"{where}.n_heads must be positive, got {self.n_heads}")
            require(self.n_kv_heads >= 0, f"{where}.n_kv_heads must be >= 0, got {self.n_kv_heads}")
            require(self.rope_base > 0, f"{where}.rope_base must be positive")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d_model, n_heads = ctx.d_model, options.n_heads
        n_kv = options.n_kv_heads or n_heads
        require(d_model % n_heads == 0, f"{ctx.where}.n_heads={n_heads} does not divide model.d_model={d_model}")
        require(n_heads % n_kv == 0, f"{ctx.where}.n_kv_heads={n_kv} does not divide {ctx.where}.n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv, d_model // n_heads
        require(self.head_dim % 2 == 0, f"head size {self.head_dim} must be even for rotary positions")
        self.rope_base = options.rope_base
        self.attend = reference_attention if options.reference else fast_attention
        self.q = ctx.linear(d_model, n_heads * self.head_dim)
        self.k = ctx.linear(d_model, n_kv * self.head_dim)
        self.v = ctx.linear(d_model, n_kv * self.head_dim)
        self.out = ctx.linear(n_heads * self.head_dim, d_model, zero_init=True)
        self.q_norm = ctx.norm(self.head_dim) if options.qk_norm else nn.Identity()
        self.k_norm = ctx.norm(self.head_dim) if options.qk_norm else nn.Identity()

    def project(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_norm(self.q(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(b, t, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_tables(torch.arange(offset, offset + t, device=x.device), self.head_dim, self.rope_base)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, 0)
        return self.merge(self.attend(q, k, v, 0))

    def flops(self, batch: int, context: int) -> Flops:
        """The four projections, plus Q K^T and P V over the full T x T scores of every head::

            forward  = 2 * 2 * n_heads * head_dim * T  per token  (PaLM: 4 * d * T at n_heads * head_dim = d)
            backward = 2x that, 2.5x through SDPA, whose fused backward recomputes Q K^T.

        Causal masking is not discounted, as in PaLM's 12 * layers * d * T.
        """
        tokens = batch * context
        projections = self.q.flops(tokens) + self.k.flops(tokens) + self.v.flops(tokens) + self.out.flops(tokens)
        per_head = attention_flops(context, context, self.head_dim, fused=self.attend is fast_attention)
        return projections + batch * self.n_heads * per_head

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> dict:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype), "pos": 0}

    def rewind(self, before: dict, kept: int) -> dict:
        """The cache after ``kept`` positions of later steps from ``before``: those steps wrote the
        keys and values already, so only the length moves (self-speculative decoding's rewind)."""
        return {**before, "pos": before["pos"] + kept}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        pos, t = state["pos"], x.shape[1]
        if pos + t > state["k"].shape[2]:
            raise ValueError(f"attention cache holds {state['k'].shape[2]} positions, asked for {pos + t}")
        q, k, v = self.project(x, pos)
        state["k"][:, :, pos:pos + t] = k.to(state["k"].dtype)
        state["v"][:, :, pos:pos + t] = v.to(state["v"].dtype)
        state["pos"] = pos + t
        keys = state["k"][:, :, :pos + t].to(q.dtype)
        values = state["v"][:, :, :pos + t].to(q.dtype)
        return self.merge(self.attend(q, keys, values, pos)), state
