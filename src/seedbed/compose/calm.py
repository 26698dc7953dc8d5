"""CALM (Bansal et al. 2024): an anchor model reads an augmenting model's features by cross-attention.

Both models are frozen and read the same tokens. After every n-th layer l of the anchor
(l = n-1, 2n-1, ...; L_A layers) a bridge reads the augmenting model's hidden state after its
layer m(l) = round((l + 1) L_B / L_A) - 1 (the same relative depth; L_B layers)::

    p_s = P a_s                                   (a: augmenting hidden, d_B -> d_A)
    q_t = Q h_t,  k_s = K p_s,  v_s = V p_s       (per head)
    h_t <- h_t + O softmax_{s <= t}(q_t . k_s / sqrt(d_head)) v_s

Only the bridges learn (on a small mixed set); O starts at zero, so a fresh CALM is the anchor
model exactly. Position t attends to the augmenting states of positions s <= t only: causal.
Decoding carries the anchor's and the augmenting model's own decode states and, per bridge,
the keys and values of the positions so far.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from seedbed.errors import UserError
from seedbed.model.attention import fast_attention
from seedbed.model.lm import LM, PlainDecoding
from seedbed.model.stack import run_stack


class Bridge(nn.Module):
    def __init__(self, d_anchor: int, d_augmenting: int, heads: int):
        super().__init__()
        if d_anchor % heads:
            raise UserError(f"CALM: {heads} bridge heads do not divide the anchor's width {d_anchor}")
        self.heads = heads
        self.project = nn.Linear(d_augmenting, d_anchor, bias=False)
        self.q, self.k, self.v = (nn.Linear(d_anchor, d_anchor, bias=False) for _ in range(3))
        self.out = nn.Linear(d_anchor, d_anchor, bias=False)
        nn.init.zeros_(self.out.weight)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, t, d_head)

    def forward(self, h: torch.Tensor, augmenting: torch.Tensor, cache: tuple | None = None,
                offset: int = 0) -> tuple[torch.Tensor, tuple]:
        """h (B, t, d_A) after attending to ``augmenting`` (B, t, d_B) of the same positions and the
        cached keys and values of the ``offset`` positions before them; returns (h, new cache)."""
        projected = self.project(augmenting)
        k, v = self.split(self.k(projected)), self.split(self.v(projected))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        attended = fast_attention(self.split(self.q(h)), k, v, offset)
        return h + self.out(attended.transpose(1, 2).flatten(2)), (k, v)


def reference_bridge(bridge: Bridge, h: torch.Tensor, augmenting: torch.Tensor) -> torch.Tensor:
    """The bridge with plain loops over positions (for tests)."""
    projected = bridge.project(augmenting)
    q, k, v = bridge.q(h), bridge.k(projected), bridge.v(projected)
    d_head = h.shape[-1] // bridge.heads
    rows = []
    for t in range(h.shape[1]):
        heads = []
        for head in range(bridge.heads):
            part = slice(head * d_head, (head + 1) * d_head)
            scores = (k[:, :t + 1, part] @ q[:, t, part, None])[..., 0] / math.sqrt(d_head)  # (B, t+1)
            heads.append((scores.softmax(-1)[..., None] * v[:, :t + 1, part]).sum(1))
        rows.append(h[:, t] + bridge.out(torch.cat(heads, -1)))
    return torch.stack(rows, 1)


class CALM(PlainDecoding, nn.Module):
    """An anchor LM with bridges into an augmenting LM; answers like the anchor."""

    label = "CALM"

    def __init__(self, anchor: LM, augmenting: LM, every: int = 2, heads: int = 4):
        super().__init__()
        if anchor.cfg.vocab_size != augmenting.cfg.vocab_size:
            raise UserError(f"CALM needs one vocabulary: the anchor has {anchor.cfg.vocab_size} tokens, "
                            f"the augmenting model {augmenting.cfg.vocab_size}")
        if augmenting.cfg.max_seq_len < anchor.cfg.max_seq_len:
            raise UserError(f"the augmenting model's context ({augmenting.cfg.max_seq_len}) is shorter than the "
                            f"anchor's ({anchor.cfg.max_seq_len})")
        if anchor.denseformer is not None or augmenting.denseformer is not None:
            raise UserError("CALM reads hidden states between layers: Denseformer models are not supported")
        if not 1 <= every <= anchor.cfg.n_layers:
            raise UserError(f"--every must be in 1..{anchor.cfg.n_layers} (the anchor's layers), got {every}")
        self.anchor, self.augmenting = anchor.requires_grad_(False), augmenting.requires_grad_(False)
        self.every, self.heads = every, heads
        layers_a, layers_b = anchor.cfg.n_layers, augmenting.cfg.n_layers
        self.anchor_layers = list(range(every - 1, layers_a, every))
        self.augmenting_layers = [max(0, round((l + 1) * layers_b / layers_a) - 1) for l in self.anchor_layers]
        self.bridges = nn.ModuleList(Bridge(anchor.cfg.d_model, augmenting.cfg.d_model, heads)
                                     for _ in self.anchor_layers)
        self.cfg = anchor.cfg

    def composition(self) -> dict:
        return {"kind": "calm", "every": self.every, "heads": self.heads,
                "models": [dataclasses.asdict(self.anchor.cfg), dataclasses.asdict(self.augmenting.cfg)]}

    def run(self, tokens: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict | None]:
        """Logits of ``tokens`` (in parallel with ``state`` None, else extending it) and the new state."""
        for model in (self.anchor, self.augmenting):
            for parts in model.shared_parts:
                parts.begin_forward()
        new = None if state is None else {"anchor": [], "augmenting": [], "bridges": [],
                                          "offset": state["offset"] + tokens.shape[1]}

        def segment(model: LM, name: str, h, embedded, lo: int, hi: int):
            states = None if state is None else state[name][lo:hi]
            h, states = run_stack(model.blocks[lo:hi], None, h, embedded, tokens, states=states)
            if new is not None:
                new[name] += states
            return h

        # The augmenting model runs only up to the deepest layer a bridge reads.
        embedded_b = self.augmenting.embed(tokens)
        h, done, features = embedded_b, 0, {}
        for m in sorted(set(self.augmenting_layers)):
            h, done = segment(self.augmenting, "augmenting", h, embedded_b, done, m + 1), m + 1
            features[m] = h
        embedded_a = self.anchor.embed(tokens)
        h, done = embedded_a, 0
        for index, (l, m) in enumerate(zip(self.anchor_layers, self.augmenting_layers, strict=True)):
            h, done = segment(self.anchor, "anchor", h, embedded_a, done, l + 1), l + 1
            cache = None if state is None else state["bridges"][index]
            h, cache = self.bridges[index](h, features[m], cache, 0 if state is None else state["offset"])
            if new is not None:
                new["bridges"].append(cache)
        h = segment(self.anchor, "anchor", h, embedded_a, done, len(self.anchor.blocks))
        return self.anchor.logits(h), new

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, None)[0]

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens).log_softmax(-1)

    def init_state(self, batch: int, max_len: int) -> dict:
        return {"anchor": self.anchor.init_state(batch, max_len),
                "augmenting": self.augmenting.init_state(batch, max_len),
                "bridges": [None] * len(self.bridges), "offset": 0}

    def step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        return self.run(tokens, state)

