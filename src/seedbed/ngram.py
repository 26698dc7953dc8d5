"""An n-gram cache with a full, normalised distribution at every position (Witten–Bell or absolute discounting).

The parameter-golf record this answers (../shared/seeds/003) kept counts of orders 2..7 and
looked up only the target token's count: not a distribution, not a valid bpb. Here the counts
of the training token stream give, at every position, a probability for every token of the
vocabulary, from training counts only.

Counts. For a token stream x and every order k = 1..K, the context of position t is the k
tokens before it, c_k(t) = x[t-k .. t-1]; the cache keeps, for every context seen in training,
the tokens that followed it and how often: n_k(c, v), with n_k(c) = sum_v n_k(c, v) and
u_k(c) = |{v : n_k(c, v) > 0}|, the number of distinct followers. Order 0 keeps the unigram
counts n_0(v).

Distribution (interpolated Witten–Bell, as PPM's escape method C):

    p_0(v)     = (n_0(v) + 1) / (N + V)                           (add-one: every token possible)
    p_k(v | c) = (n_k(c, v) + u_k(c) p_{k-1}(v | c')) / (n_k(c) + u_k(c))   when n_k(c) > 0
    p_k(v | c) = p_{k-1}(v | c')                                    for a context never seen

or, with ``smoothing="absolute"`` (interpolated absolute discounting, Kneser–Ney's discount
without its continuation counts), for a seen context

    p_k(v | c) = (max(n_k(c, v) - D, 0) + D u_k(c) p_{k-1}(v | c')) / n_k(c),   0 < D <= 1,

where c' drops the oldest token of c. Each p_k sums to 1 over v because p_{k-1} does, so
the cache's distribution p_K is normalised at every position by construction; a position
with fewer than k tokens before it uses the orders it has.

Keys. A context of k tokens is the 64-bit integer sum_i x[t-i] V^(i-1) (wrapping modulo 2^64),
exact (a bijection) while V^k <= 2^64 (bytes: every order up to 8) and a hash beyond; a
collision would merge two contexts' counts, which changes the prediction, never the
normalisation. Each order is stored as its sorted context keys, the distinct-follower count
of each (CSR offsets), and the followers' tokens and counts.

``leave_one_out`` scores a position of the very stream that was counted as if it had not
been: its own occurrence is taken out of n_k(c, v), n_k(c) and (when it was the only one)
u_k(c) at every order, so that a mixer fitted on the training stream sees the cache as it
will be on unseen text.

``distribution_reference`` is the plain per-position Python version of the same equations;
the tests hold the vectorised ``distribution`` to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_ORDERS = 6
SMOOTHINGS = ("witten-bell", "absolute")
MASK64 = (1 << 64) - 1


@dataclass
class OrderTable:
    """The counts of one order k >= 1: contexts sorted by key, followers in CSR layout."""
    keys: np.ndarray  # (C,) uint64, sorted, unique
    offsets: np.ndarray  # (C + 1,) int64: the followers of context i are [offsets[i], offsets[i+1])
    tokens: np.ndarray  # (F,) int64: each context's followers, ascending
    counts: np.ndarray  # (F,) int64: n_k(c, v)
    totals: np.ndarray  # (C,) int64: n_k(c)

    @property
    def distinct(self) -> np.ndarray:
        return np.diff(self.offsets)


def context_keys(tokens: np.ndarray, order: int, vocab: int) -> np.ndarray:
    """Per position t, the key of the ``order`` tokens before it (uint64); positions t < order
    have no such context and get key 0 (callers mask them)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    keys = np.zeros(len(tokens), dtype=np.uint64)
    scale = np.uint64(1)
    with np.errstate(over="ignore"):
        for i in range(1, order + 1):
            keys[i:] += tokens[:len(tokens) - i] * scale
            scale = scale * np.uint64(vocab)
    return keys


@dataclass
class NgramCache:
    vocab: int
    unigram: np.ndarray  # (V,) int64: n_0(v)
    orders: list[OrderTable]  # orders[k - 1] is order k
    smoothing: str = "witten-bell"  # or "absolute" (interpolated absolute discounting by ``discount``)
    discount: float = 0.75

    @property
    def max_order(self) -> int:
        return len(self.orders)

    # -- counting ------------------------------------------------------------------------
    @classmethod
    def count(cls, tokens: np.ndarray, vocab: int, max_order: int = DEFAULT_ORDERS, smoothing: str = "witten-bell",
              discount: float = 0.75) -> "NgramCache":
        """The counts of every order 0..max_order over one token stream."""
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"tokens must be in [0, {vocab})")
        unigram = np.bincount(tokens, minlength=vocab).astype(np.int64)
        orders = [count_order(tokens, k, vocab) for k in range(1, max_order + 1)]
        return cls(vocab, unigram, orders, smoothing, discount)

    # -- the distribution ----------------------------------------------------------------
    def distribution(self, tokens: np.ndarray, positions: np.ndarray | None = None,
                     leave_one_out: bool = False) -> torch.Tensor:
        """p_K(. | context) (float64, (P, V)) at ``positions`` of the stream ``tokens`` (default: all),
        each from the tokens before it. ``leave_one_out``: ``tokens`` is the counted stream itself,
        and each position's own occurrence is taken out of the counts first."""
        return self.distribution_and_confidence(tokens, positions, leave_one_out)[0]

    def distribution_and_confidence(self, tokens: np.ndarray, positions: np.ndarray | None = None,
                                    leave_one_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``distribution``, and per position and order k = 1..K what a mixer may weigh it by
        (float64, (P, K, 2)): log(1 + n_k(c)) and the escape weight u_k(c) / (n_k(c) + u_k(c)),
        both 0 for a context never seen (escape 1)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.arange(len(tokens)) if positions is None else np.asarray(positions, dtype=np.int64)
        targets = tokens[positions]
        unigram = np.broadcast_to(self.unigram.astype(np.float64), (len(positions), self.vocab)).copy()
        total = float(self.unigram.sum())
        if leave_one_out:
            unigram[np.arange(len(positions)), targets] -= 1
            total -= 1
        probs = torch.from_numpy((unigram + 1) / (total + self.vocab))
        rows = np.arange(len(positions))
        confidence = np.zeros((len(positions), self.max_order, 2))
        confidence[:, :, 1] = 1.0
        # The keys of the scored positions only, one order longer each time round (as context_keys
        # builds them): a chunk of a long stream costs its own length, not the stream's.
        keys, scale = np.zeros(len(positions), dtype=np.uint64), np.uint64(1)
        for k, table in enumerate(self.orders, start=1):
            has_context = positions >= k
            with np.errstate(over="ignore"):
                keys[has_context] += tokens[positions[has_context] - k].astype(np.uint64) * scale
                scale = scale * np.uint64(self.vocab)
            index = np.searchsorted(table.keys, keys)
            found = has_context & (index < len(table.keys))
            found[found] &= table.keys[index[found]] == keys[found]
            if not found.any():
                continue
            at, ctx = rows[found], index[found]
            local = np.arange(len(at))
            starts, lengths = table.offsets[ctx], table.distinct[ctx]
            follower = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            counts = np.zeros((len(at), self.vocab))
            counts[np.repeat(local, lengths), table.tokens[follower]] = table.counts[follower]
            n = table.totals[ctx].astype(np.float64)
            u = lengths.astype(np.float64)
            if leave_one_out:
                own = counts[local, targets[found]]
                counts[local, targets[found]] -= 1
                n -= 1
                u -= own == 1
            # A context seen only at this very position is, left out, a context never seen.
            seen = n > 0
            at, n, u = at[seen], n[seen], u[seen]
            n_cv = torch.from_numpy(counts[seen])
            n_t, u_t = torch.from_numpy(n)[:, None], torch.from_numpy(u)[:, None]
            if self.smoothing == "absolute":
                probs[at] = ((n_cv - self.discount).clamp(min=0) + self.discount * u_t * probs[at]) / n_t
            else:
                probs[at] = (n_cv + u_t * probs[at]) / (n_t + u_t)
            confidence[at, k - 1, 0] = np.log1p(n)
            confidence[at, k - 1, 1] = u / (n + u)
        return probs, torch.from_numpy(confidence)

    def distribution_reference(self, tokens: list[int], t: int, leave_one_out: bool = False) -> list[float]:
        """p_K(. | tokens[:t]), one position at a time in plain Python (for the tests)."""
        own = int(tokens[t]) if leave_one_out else -1
        unigram = [int(n) - (v == own) for v, n in enumerate(self.unigram)]
        probs = [(unigram[v] + 1) / (sum(unigram) + self.vocab) for v in range(self.vocab)]
        for k, table in enumerate(self.orders, start=1):
            if t < k:
                break
            key = sum(int(tokens[t - i]) * self.vocab ** (i - 1) for i in range(1, k + 1)) & MASK64
            hit = np.flatnonzero(table.keys == np.uint64(key))
            if not len(hit):
                continue
            c = int(hit[0])
            lo, hi = int(table.offsets[c]), int(table.offsets[c + 1])
            followers = {int(v): int(n) for v, n in zip(table.tokens[lo:hi], table.counts[lo:hi], strict=True)}
            if leave_one_out:
                followers[own] -= 1
                followers = {v: n for v, n in followers.items() if n}
            if not followers:
                continue
            n, u = sum(followers.values()), len(followers)
            if self.smoothing == "absolute":
                d = self.discount
                probs = [(max(followers.get(v, 0) - d, 0) + d * u * probs[v]) / n for v in range(self.vocab)]
            else:
                probs = [(followers.get(v, 0) + u * probs[v]) / (n + u) for v in range(self.vocab)]
        return probs


def count_order(tokens: np.ndarray, k: int, vocab: int) -> OrderTable:
    """Order k's table: every (context, follower) pair of the stream, counted."""
    keys = context_keys(tokens, k, vocab)[k:]
    followers = tokens[k:]
    order = np.lexsort((followers, keys))
    keys, followers = keys[order], followers[order]
    new_pair = np.ones(len(keys), dtype=bool)
    new_pair[1:] = (keys[1:] != keys[:-1]) | (followers[1:] != followers[:-1])
    pair_starts = np.flatnonzero(new_pair)
    pair_keys, pair_tokens = keys[pair_starts], followers[pair_starts]
    pair_counts = np.diff(np.append(pair_starts, len(keys)))
    new_context = np.ones(len(pair_keys), dtype=bool)
    new_context[1:] = pair_keys[1:] != pair_keys[:-1]
    context_starts = np.flatnonzero(new_context)
    offsets = np.append(context_starts, len(pair_keys)).astype(np.int64)
    totals = np.add.reduceat(pair_counts, context_starts) if len(context_starts) else np.zeros(0, dtype=np.int64)
    return OrderTable(pair_keys[context_starts], offsets, pair_tokens.astype(np.int64), pair_counts.astype(np.int64),
                      totals.astype(np.int64))
