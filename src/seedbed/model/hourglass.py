"""Hourglass stage: compress groups of positions into latents, run a shorter stack, upsample.

The encoder / latent / decoder model of efficient_transformer_v1 (seeds/001), causal as in
the Hourglass Transformer (Nawrot et al. 2021, arXiv:2110.13711). The stage is a mixer: it
reads u = norm(h), (B, T, d) at positions 0..T-1, and its output is added to h. With k the
group length and K the latents per group (K <= k):

Groups. Latent group j = 0 .. ceil(T/k) - 1 summarises the k positions jk-k+1 .. jk: the
sequence shifted right by k - 1, positions before 0 being zero vectors. Its latents exist
once position jk is known, and they feed positions jk .. jk+k-1 only. The last group needs
no padding for any T: its last position jk is <= T - 1.

Compression of group j's positions G_j (k x d) into K latents c_j1 .. c_jK:

    perceiver:  c_ja = Q_a + W_o MHA(q = Q_a, k = W_k G_j, v = W_v G_j)
                (learned queries Q, rotary angles: the queries at offset k-1, key r at r)
    last:       c_j = the last K outputs of the ``compress_plan`` layers run over G_j alone
                (Mirasol's transformer encoder; causal within the group)
    then        c_ja += E_a      (E: k x d group-position table, shared with the upsampling)

Latent stack. z^0 = (c_01..c_0K, c_11..c_1K, ...), length ceil(T/k) K, runs through the
``inner`` plan: global blocks over all latents (causal in latent order), local blocks
(``scope = "local"``) over the K latents of one group, a nested hourglass over groups of
latents; an optional Denseformer over its depths. z = norm(its output). Any mixer works
inside, since the latent sequence is causal in the usual sense: latent (j, a) depends on
positions <= jk only, and latent groups arrive in order.

Upsampling to position t = jk + r, and the output:

    replicate:  b_t = z_{j, floor(rK/k)} + E_r                       (the latest group's latents)
    attention:  b_t = z_{j, floor(rK/k)} + E_r
                      + W_o' MHA(q = norm(u_t + that), k, v = latents z_{j'a} with j' <= j)
    y_t = W_out b_t         (W_out starts at zero: a new stage starts as the identity)

Which positions y_t reads (t = jk + r; tests/test_hourglass.py checks these sets exactly,
through autograd): u_0 .. u_jk, the groups completed by t, and with attention upsampling u_t
too (its query); replicating latent slot a of a "last" compression, whose causal group
encoder has read only the group's first k - K + 1 + a positions, reads u_0 .. u_{jk-K+1+a}.
Never a position after t. The rest of t's own group, u_{jk+1} .. u_t, reaches t only through
the residual stream h_t (the layers before this one).

Latent loss (optional, training only): ``latent_loss`` x the mean squared error between
P z_j and the next group's compressed latents c_{j+1} (no gradient into the target), both
RMS-normalised: each group's latents learn to predict the next group (the seed's optional
latent loss, after Mirasol).

Decoding keeps one state per stage: the last k-1 inputs (the front of the next group), the
position, the latest group's z (it feeds positions until the next group completes), the
inner layers' states, and for attention upsampling the keys and values of all latents so
far. The parallel forward is the same code run from a fresh state with the inner layers in
parallel, so a step of any length (a chunked prefill, one token) gives the same outputs.
``reference = true`` swaps the batched compression and upsampling for plain loops over
groups and positions; tests check the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.attention import apply_rotary, attention_flops, rotary_tables
from seedbed.model.layers import BuildContext
from seedbed.model.moe import record_aux_loss
from seedbed.model.stack import build_denseformer, build_stack, run_stack
from seedbed.perf import Flops
from seedbed.registry import MIXERS, require

COMPRESSIONS = ("perceiver", "last")
UPSAMPLINGS = ("replicate", "attention")


def plain_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v in float32, every query reading every key: the reference loops'
    step (one group's latents, one upsampled position)."""
    scores = queries.float() @ keys.float().transpose(-1, -2) / math.sqrt(queries.shape[-1])
    return (scores.softmax(-1) @ values.float()).to(keys.dtype)


@MIXERS.register("hourglass")
class Hourglass(nn.Module):
    @dataclass
    class Options:
        group: int = 4  # k: positions per group
        latents: int = 1  # K: latents per group (<= group)
        compress: str = "perceiver"  # perceiver | last
        compress_plan: list[str] = field(default_factory=lambda: ["transformer"])  # compress = "last": its layers
        upsample: str = "replicate"  # replicate | attention
        n_heads: int = 4  # heads of the perceiver and of attention upsampling
        inner: list[str] = field(default_factory=lambda: ["transformer*2"])  # the latent stack's blocks
        denseformer: dict[str, Any] = field(default_factory=dict)  # over the inner plan: {dilation, period}
        latent_loss: float = 0.0  # weight of the next-group latent prediction loss (0: off)
        reference: bool = False  # plain loops for compression and upsampling (tests)

        def check(self, where: str) -> None:
            require(self.group > 0, f"{where}.group must be positive, got {self.group}")
            require(0 < self.latents <= self.group,
                    f"{where}.latents must be in 1..group={self.group}, got {self.latents}")
            require(self.compress in COMPRESSIONS,
                    f"{where}.compress must be one of {', '.join(COMPRESSIONS)}, got {self.compress!r}")
            require(self.upsample in UPSAMPLINGS,
                    f"{where}.upsample must be one of {', '.join(UPSAMPLINGS)}, got {self.upsample!r}")
            require(self.n_heads > 0, f"{where}.n_heads must be positive, got {self.n_heads}")
            require(len(self.inner) > 0, f"{where}.inner must name at least one block")
            require(self.compress != "last" or len(self.compress_plan) > 0,
                    f"{where}.compress_plan must name at least one block when compress = 'last'")
            require(self.latent_loss >= 0, f"{where}.latent_loss must be >= 0, got {self.latent_loss}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        d_model, cfg = ctx.d_model, ctx.model
        self.group, self.latents, self.n_heads = options.group, options.latents, options.n_heads
        where = ctx.where
        require(d_model % options.n_heads == 0,
                f"{where}.n_heads={options.n_heads} does not divide model.d_model={d_model}")
        self.head_dim = d_model // options.n_heads
        require(self.head_dim % 2 == 0, f"{where}: head size {self.head_dim} must be even for rotary positions")
        self.compression, self.upsampling, self.reference = options.compress, options.upsample, options.reference
        self.latent_loss_weight = options.latent_loss
        self.aux_loss = None
        self.sums_over_calls = False  # set by the stack when several depths share this stage
        self.group_position_embedding = nn.Parameter(torch.randn(options.group, d_model) * 0.02)
        if options.compress == "perceiver":
            self.latent_query_embedding = nn.Parameter(torch.randn(options.latents, d_model) * 0.02)
            self.key, self.value = ctx.linear(d_model, d_model), ctx.linear(d_model, d_model)
            self.compress_out = ctx.linear(d_model, d_model)
            self.query_norm, self.key_norm = ctx.norm(self.head_dim), ctx.norm(self.head_dim)
        else:
            plan = cfg.expand_pattern(options.compress_plan, f"{where}.compress_plan")
            self.compress_shared, self.compress_layers = build_stack(cfg, plan, options.group, ctx.path)
        plan = cfg.expand_pattern(options.inner, f"{where}.inner")
        self.inner_shared, self.inner = build_stack(cfg, plan, self.latent_length(ctx.max_seq_len), ctx.path,
                                                    group=options.latents)
        self.inner_denseformer = build_denseformer(len(plan), options.denseformer, f"{where}.denseformer")
        self.latent_norm = ctx.norm(d_model)
        if options.upsample == "attention":
            self.up_norm = ctx.norm(d_model)
            self.up_query, self.up_key = ctx.linear(d_model, d_model), ctx.linear(d_model, d_model)
            self.up_value, self.up_out = ctx.linear(d_model, d_model), ctx.linear(d_model, d_model)
            self.up_query_norm, self.up_key_norm = ctx.norm(self.head_dim), ctx.norm(self.head_dim)
        self.predictor = ctx.linear(d_model, d_model) if options.latent_loss else None
        self.out = ctx.linear(d_model, d_model, zero_init=True)

    def latent_length(self, length: int) -> int:
        """Latents for ``length`` positions: K per group, ceil(length / k) groups."""
        return -(-length // self.group) * self.latents

    # --- compression: (B, n, k, d) groups -> (B, n, K, d) latents -------------------------------

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., T, d) -> (..., H, T, head_dim)."""
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)

    def perceiver_inputs(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (H, K, hd), keys and values (B, n, H, k, hd), with rotary angles applied."""
        k = self.group
        queries = self.query_norm(self.heads(self.latent_query_embedding.to(groups.dtype)))
        keys = self.key_norm(self.heads(self.key(groups)))
        cos, sin = rotary_tables(torch.arange(k, device=groups.device), self.head_dim, 10000.0)
        keys = apply_rotary(keys, cos, sin)
        queries = apply_rotary(queries, cos[-1:], sin[-1:])
        return queries, keys, self.heads(self.value(groups))

    def perceiver(self, groups: torch.Tensor) -> torch.Tensor:
        batch, n = groups.shape[:2]
        queries, keys, values = self.perceiver_inputs(groups)
        if self.reference:
            mixed = torch.stack([plain_attention(queries, keys[:, j], values[:, j]) for j in range(n)], 1)
        else:
            queries = queries.expand(batch * n, *queries.shape)
            mixed = F.scaled_dot_product_attention(queries, keys.flatten(0, 1), values.flatten(0, 1))
            mixed = mixed.unflatten(0, (batch, n))
        mixed = mixed.transpose(-3, -2).flatten(-2)  # (B, n, K, d)
        return self.latent_query_embedding.to(groups.dtype) + self.compress_out(mixed)

    def last_outputs(self, groups: torch.Tensor) -> torch.Tensor:
        batch, n, k, d = groups.shape
        if self.reference:
            outputs = [run_stack(self.compress_layers, None, groups[:, j], groups[:, j], None)[0] for j in range(n)]
            return torch.stack(outputs, 1)[:, :, -self.latents:]
        flat = groups.reshape(batch * n, k, d)
        out = run_stack(self.compress_layers, None, flat, flat, None)[0]
        return out[:, -self.latents:].reshape(batch, n, self.latents, d)

    def compress(self, groups: torch.Tensor) -> torch.Tensor:
        latents = self.perceiver(groups) if self.compression == "perceiver" else self.last_outputs(groups)
        return latents + self.group_position_embedding[:self.latents].to(latents.dtype)

    # --- upsampling: each position's latent group, offset and visible latents ---------------------

    def replicate(self, known: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """b_t = z_{j, floor(r K / k)} + E_r; ``known`` (B, m, K, d) holds groups from ``slots``' 0."""
        which = offsets * self.latents // self.group
        if self.reference:
            rows = [known[:, int(s), int(w)] + self.group_position_embedding[int(r)].to(known.dtype)
                    for s, w, r in zip(slots, which, offsets)]
            return torch.stack(rows, 1)
        return known[:, slots, which] + self.group_position_embedding[offsets].to(known.dtype)

    def attend_latents(self, u: torch.Tensor, base: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       visible: torch.Tensor) -> torch.Tensor:
        """Attention upsampling: queries from norm(u + base), over the latents' keys and values
        (B, H, M, hd); ``visible`` (T, M) says which latents each position may read."""
        queries = self.up_query_norm(self.heads(self.up_query(self.up_norm(u + base))))
        if self.reference:
            rows = []
            for t in range(u.shape[1]):
                seen = visible[t].nonzero()[:, 0]
                rows.append(plain_attention(queries[:, :, t:t + 1], keys[:, :, seen], values[:, :, seen]))
            mixed = torch.cat(rows, 2)
        else:
            mixed = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible)
        return base + self.up_out(mixed.transpose(1, 2).flatten(2))

    # --- the stage -------------------------------------------------------------------------------

    def fresh_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        d_model = self.group_position_embedding.shape[1]
        return {"pos": 0, "tail": torch.zeros(batch, self.group - 1, d_model, device=device, dtype=dtype),
                "latest": torch.zeros(batch, self.latents, d_model, device=device, dtype=dtype),
                "inner": None, "keys": None, "values": None, "count": 0}

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> dict:
        state = self.fresh_state(batch, device, dtype)
        latents = self.latent_length(max_len)
        state["inner"] = [layer.init_state(batch, latents, device, dtype) for layer in self.inner]
        if self.upsampling == "attention":
            shape = (batch, self.n_heads, latents, self.head_dim)
            state["keys"] = torch.zeros(shape, device=device, dtype=dtype)
            state["values"] = torch.zeros(shape, device=device, dtype=dtype)
        return state

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.advance(u, self.fresh_state(u.shape[0], u.device, u.dtype), stepping=False)[0]

    def step(self, u: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        return self.advance(u, state, stepping=True)

    def advance(self, u: torch.Tensor, state: dict, stepping: bool) -> tuple[torch.Tensor, dict]:
        batch, length, d_model = u.shape
        k, n_latents, pos = self.group, self.latents, state["pos"]
        # full[:, i] is position pos - (k - 1) + i: the last k - 1 inputs, then this call's.
        full = torch.cat([state["tail"].to(u.dtype), u], 1)
        first, last = -(-pos // k), (pos + length - 1) // k  # the groups completed by this call
        n = last - first + 1
        known = state["latest"].to(u.dtype)[:, None]  # group first - 1, then the new groups
        if not self.sums_over_calls:
            self.aux_loss = None
        if n > 0:
            start = first * k - pos  # index in full of group first's first position, first k - k + 1
            latents = self.compress(full[:, start:start + n * k].reshape(batch, n, k, d_model))
            z0 = latents.reshape(batch, n * n_latents, d_model)
            z, state["inner"] = run_stack(self.inner, self.inner_denseformer, z0, z0, None,
                                          states=state["inner"] if stepping else None)
            z = self.latent_norm(z)
            if self.predictor is not None and self.training and not stepping and n > 1:
                record_aux_loss(self, self.latent_loss(z.view(batch, n, n_latents, d_model), latents))
            known = torch.cat([known, z.view(batch, n, n_latents, d_model)], 1)
        positions = torch.arange(pos, pos + length, device=u.device)
        base = self.replicate(known, positions // k - first + 1, positions % k)
        if self.upsampling == "attention":
            keys, values = self.latent_keys(known[:, 1:], state, stepping)
            base = self.attend_latents(u, base, keys, values, self.visible(positions, keys.shape[2]))
        state["pos"] = pos + length
        state["tail"] = full[:, full.shape[1] - (k - 1):]
        state["latest"] = known[:, -1]
        return self.out(base), state

    def latent_keys(self, new: torch.Tensor, state: dict, stepping: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every latent a position of this call may read, (B, H, M, hd):
        the new groups' (in parallel: all of them), after the cached ones when decoding."""
        flat = new.flatten(1, 2)
        keys, values = self.up_key_norm(self.heads(self.up_key(flat))), self.heads(self.up_value(flat))
        if not stepping:
            return keys, values
        count = state["count"]
        state["keys"][:, :, count:count + keys.shape[2]] = keys.to(state["keys"].dtype)
        state["values"][:, :, count:count + keys.shape[2]] = values.to(state["values"].dtype)
        state["count"] = count = count + keys.shape[2]
        return state["keys"][:, :, :count].to(keys.dtype), state["values"][:, :, :count].to(keys.dtype)

    def visible(self, positions: torch.Tensor, count: int) -> torch.Tensor:
        """(T, M): of the ``count`` latents from group 0 on, latent m (group m // K) is visible to
        position t when its group is <= t // k."""
        groups = torch.arange(count, device=positions.device) // self.latents
        return groups[None, :] <= (positions // self.group)[:, None]

    def latent_loss(self, z: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """weight x MSE(rms(P z_j), rms(c_{j+1})): each group's latents predict the next group's."""
        prediction = F.rms_norm(self.predictor(z[:, :-1]), (z.shape[-1],))
        target = F.rms_norm(latents[:, 1:].detach(), (z.shape[-1],))
        return self.latent_loss_weight * F.mse_loss(prediction.float(), target.float())

    def flops(self, batch: int, context: int) -> Flops:
        """Compression, the inner stack at ceil(T/k) K latents, upsampling and the output projection."""
        k, n_latents, heads, hd = self.group, self.latents, self.n_heads, self.head_dim
        groups = -(-context // k)
        latents, tokens = groups * n_latents, batch * context
        if self.compression == "perceiver":
            total = (self.key.flops(batch * groups * k) + self.value.flops(batch * groups * k)
                     + self.compress_out.flops(batch * latents)
                     + batch * groups * heads * attention_flops(n_latents, k, hd))
        else:
            total = sum((layer.flops(batch * groups, k) for layer in self.compress_layers), Flops())
        total = total + sum((layer.flops(batch, latents) for layer in self.inner), Flops())
        if self.upsampling == "attention":
            total = (total + self.up_query.flops(tokens) + self.up_out.flops(tokens) + self.up_key.flops(batch * latents)
                     + self.up_value.flops(batch * latents) + batch * heads * attention_flops(context, latents, hd))
        if self.predictor is not None:
            total = total + self.predictor.flops(batch * (groups - 1) * n_latents)
        return total + self.out.flops(tokens)
