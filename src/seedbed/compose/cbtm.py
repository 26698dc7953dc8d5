"""c-BTM: experts trained on the clusters of a corpus, mixed by how near the context is to each cluster.

At every position t the next-token distribution is a mixture of the K experts'::

    p(x_{t+1} | x_{<=t}) = sum_k w_k(t) p_k(x_{t+1} | x_{<=t})
    w(t) = softmax over the top_k clusters of -d_k(t)^2 / T, 0 for the others
    d_k(t) = || e(t) - c_k ||

e(t) is the tf-idf embedding (``cluster.py``) of the context the experts see at t: the tokens
x_a..x_t of the current window (the same window in ``seedbed eval``, ``compress`` and
``generate``, each restarting it the same way), c_k the clusters' centres, T the temperature.
The weights use no token after t, so the mixture is causal and normalised by construction.

The router keeps the embedding incrementally. Every token adds its features f (``cluster.py``:
the unigram x_s and, after the window's first token, the bigram (x_{s-1}, x_s)); with n_f the
feature's count before it, u_k = idf ⊙ c_k and S = ||n ⊙ idf||^2::

    S  += idf_f^2 (2 n_f + 1)
    D_k += u_k[f]
    e·c_k = D_k / sqrt(S),    d_k^2 = 1 - 2 e·c_k + ||c_k||^2

so a whole window is a gather and a cumulative sum (``Router.advance``), and decoding carries
(counts, S, D, the last token) from step to step. ``reference_log_weights`` builds e(t) from
scratch at every position, for the tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from seedbed.compose.cluster import bigram_features, feature_count
from seedbed.errors import UserError
from seedbed.model.lm import LM, PlainDecoding


def prior_occurrences(features: torch.Tensor) -> torch.Tensor:
    """For each entry of each row, how many earlier entries of the row hold the same value."""
    length = features.shape[-1]
    positions = torch.arange(length, device=features.device).expand_as(features)
    order = (features * length + positions).argsort(-1)  # by value, then by position
    ordered = features.gather(-1, order)
    starts_run = torch.ones_like(ordered, dtype=torch.bool)
    starts_run[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run_start = torch.where(starts_run, positions, 0).cummax(-1).values
    return torch.empty_like(features).scatter_(-1, order, positions - run_start)


class Router(nn.Module):
    """The c-BTM router: log w(t) from the context's tf-idf distances to the cluster centres."""

    storage_kinds = {"idf": "fp32", "centres": "fp32"}  # small; kept exact

    def __init__(self, idf: torch.Tensor, centres: torch.Tensor, vocab: int, top_k: int, temperature: float):
        super().__init__()
        self.vocab, self.top_k, self.temperature = vocab, top_k, temperature
        self.register_buffer("idf", idf.double())  # (F,)
        self.register_buffer("centres", centres.double())  # (K, F)

    @property
    def clusters(self) -> int:
        return self.centres.shape[0]

    def init_state(self, batch: int) -> dict:
        device = self.idf.device
        return {"counts": torch.zeros(batch, feature_count(self.vocab) + 1, dtype=torch.float64, device=device),
                "norm2": torch.zeros(batch, dtype=torch.float64, device=device),
                "dots": torch.zeros(batch, self.clusters, dtype=torch.float64, device=device),
                "last": torch.full((batch,), -1, dtype=torch.int64, device=device)}

    def token_features(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B, t, 2): each token's unigram and bigram feature; the bigram of a window's first token
        is the null feature F (idf 0, centre 0)."""
        previous = torch.cat([last[:, None], tokens[:, :-1]], 1)
        bigrams = torch.from_numpy(bigram_features(previous.cpu().numpy().clip(0), tokens.cpu().numpy(), self.vocab))
        bigrams = torch.where(previous >= 0, bigrams.to(tokens.device), feature_count(self.vocab))
        return torch.stack([tokens, bigrams], -1)

    def advance(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """log w (B, t, K) at each of ``tokens`` (B, t), each weighing the context up to and
        including it, and the state after them."""
        batch, length = tokens.shape
        features = self.token_features(tokens, state["last"]).reshape(batch, 2 * length)
        prior = state["counts"].gather(1, features) + prior_occurrences(features)
        idf = torch.cat([self.idf, self.idf.new_zeros(1)])
        weighted_centres = torch.cat([self.centres, self.centres.new_zeros(self.clusters, 1)], 1) * idf
        norm2 = (idf[features] ** 2 * (2 * prior + 1)).reshape(batch, length, 2).sum(-1).cumsum(1)
        dots = weighted_centres.T[features].reshape(batch, length, 2, -1).sum(2).cumsum(1)
        norm2, dots = norm2 + state["norm2"][:, None], dots + state["dots"][:, None]
        cosine = dots / norm2.sqrt()[..., None]
        distance2 = 1 - 2 * cosine + (self.centres ** 2).sum(1)
        counts = state["counts"].scatter_add(1, features, torch.ones_like(features, dtype=torch.float64))
        new_state = {"counts": counts, "norm2": norm2[:, -1], "dots": dots[:, -1], "last": tokens[:, -1]}
        return self.log_weights(distance2), new_state

    def log_weights(self, distance2: torch.Tensor) -> torch.Tensor:
        """log softmax over the top_k nearest clusters of -d^2 / T; -inf for the others."""
        scores = -distance2 / self.temperature
        if self.top_k < self.clusters:
            kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.top_k, -1).indices, True)
            scores = scores.masked_fill(~kept, float("-inf"))
        return scores.log_softmax(-1)


def reference_log_weights(tokens: list[int], idf: np.ndarray, centres: np.ndarray, vocab: int, top_k: int,
                          temperature: float) -> np.ndarray:
    """log w (t, K) of one window, the embedding built from scratch at every position (for tests)."""
    rows = []
    counts = np.zeros(feature_count(vocab))
    for s, token in enumerate(tokens):
        counts[token] += 1
        if s > 0:
            counts[bigram_features(np.array([tokens[s - 1]]), np.array([token]), vocab)[0]] += 1
        embedded = counts * idf / np.linalg.norm(counts * idf)
        scores = -((embedded[None, :] - centres) ** 2).sum(1) / temperature
        kept = np.argsort(-scores, kind="stable")[:top_k]
        weights = np.full(len(scores), -np.inf)
        weights[kept] = scores[kept] - np.logaddexp.reduce(scores[kept])
        rows.append(weights)
    return np.array(rows)


class CBTM(PlainDecoding, nn.Module):
    """K expert LMs (one vocabulary, one context length) mixed by ``Router``. Its "logits" are the
    mixture's log-probabilities, so every consumer of an LM's logits normalises them unchanged."""

    label = "c-BTM"

    def __init__(self, members: list[LM], router: Router):
        super().__init__()
        if len(members) != router.clusters:
            raise UserError(f"c-BTM has {len(members)} experts for {router.clusters} clusters")
        shapes = {(m.cfg.vocab_size, m.cfg.max_seq_len) for m in members}
        if len(shapes) != 1:
            raise UserError("c-BTM experts must share one vocabulary and one context length, got "
                            + ", ".join(f"V={v} context={c}" for v, c in sorted(shapes)))
        self.members = nn.ModuleList(members)
        self.router = router
        self.cfg = members[0].cfg

    def composition(self) -> dict:
        """What an artifact's manifest records to rebuild this model (``compose.build``)."""
        return {"kind": "cbtm", "members": len(self.members), "top_k": self.router.top_k,
                "temperature": float(self.router.temperature),
                "models": [dataclasses.asdict(member.cfg) for member in self.members]}

    def mix(self, member_logits: list[torch.Tensor], log_weights: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([logits.log_softmax(-1) for logits in member_logits], -2)  # (B, t, K, V)
        return torch.logsumexp(stacked + log_weights.to(stacked.dtype)[..., None], -2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        log_weights, _ = self.router.advance(tokens, self.router.init_state(tokens.shape[0]))
        return self.mix([member(tokens) for member in self.members], log_weights)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens)

    def init_state(self, batch: int, max_len: int) -> list:
        return [member.init_state(batch, max_len) for member in self.members] + [self.router.init_state(batch)]

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        outputs = [member.step(tokens, member_state) for member, member_state in zip(self.members, state[:-1], strict=True)]
        log_weights, router_state = self.router.advance(tokens, state[-1])
        return self.mix([logits for logits, _ in outputs], log_weights), [s for _, s in outputs] + [router_state]



def checked_temperature(fields: dict, where: str) -> float:
    """A manifest's c-BTM router temperature, bounds-checked."""
    temperature = fields.get("temperature")
    if not (isinstance(temperature, float) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"{where} is corrupted (c-BTM temperature out of range)")
    return temperature
