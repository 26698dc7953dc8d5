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

Keys. A context of k tokens is the 64-bit integer key_k = sum_{i<=k} x[t-i] V^(i-1) while
V^k <= 2^64 (exact, a bijection: bytes up to order 8, a vocabulary of 1024 up to order 6);
beyond that each older token is hashed in, key_k = key_{k-1} H + x[t-k] + 1 modulo 2^64 with
H an odd constant, so every token of the context counts (the plain polynomial would wrap:
with V = 2^b the tokens beyond 64/b places would vanish from it). A collision would merge
two contexts' counts, which changes the prediction, never the normalisation. Each order is
stored as its sorted context keys, the distinct-follower count of each (CSR offsets), and the
followers' tokens and counts.

``leave_one_out`` scores a position of the very stream that was counted as if it had not
been: its own occurrence is taken out of n_k(c, v), n_k(c) and (when it was the only one)
u_k(c) at every order, so that a mixer fitted on the training stream sees the cache as it
will be on unseen text.

``distribution_reference`` is the plain per-position Python version of the same equations;
the tests hold the vectorised ``distribution`` to it.
"""

from __future__ import annotations

import functools
import lzma
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from seedbed.errors import UserError

DEFAULT_ORDERS = 6
SMOOTHINGS = ("witten-bell", "absolute")
MASK64 = (1 << 64) - 1
MAX_ORDER = 16
MAGIC = b"SBNG"
VERSION = 2  # 2: contexts beyond the exact orders hashed (1 wrapped them, see Keys)
HEADER = struct.Struct("<4sBBHIdQI")  # magic, version, smoothing, orders, vocab, discount, raw length, CRC32


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

    def add_counts(self, keys: np.ndarray, valid: np.ndarray, counts: np.ndarray, weight: float = 1.0) -> None:
        """counts[i, v] += weight * n_k(keys[i], v) for every row i with ``valid`` and a key in the table."""
        index = np.searchsorted(self.keys, keys)
        found = valid & (index < len(self.keys))
        found[found] &= self.keys[index[found]] == keys[found]
        if not found.any():
            return
        ctx = index[found]
        starts, lengths = self.offsets[ctx], self.distinct[ctx]
        follower = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        counts[np.repeat(np.flatnonzero(found), lengths), self.tokens[follower]] += weight * self.counts[follower]


HASH_MULTIPLIER = 0x9E3779B97F4A7C15  # odd (2^64 / the golden ratio): multiplying by it permutes 2^64


@functools.cache  # extend_keys asks once per order of every lookup
def exact_orders(vocab: int) -> int:
    """The longest context whose key is exact: the largest k with V^k <= 2^64."""
    k = 0
    while vocab ** (k + 1) <= 1 << 64:
        k += 1
    return k


def extend_keys(keys: np.ndarray, older: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """The order-k keys (uint64) from the order-(k - 1) keys and the tokens k places back."""
    older = older.astype(np.uint64)
    with np.errstate(over="ignore"):
        if k <= exact_orders(vocab):
            return keys + older * np.uint64(vocab ** (k - 1))
        return keys * np.uint64(HASH_MULTIPLIER) + older + np.uint64(1)


def context_key(context: list[int], vocab: int) -> int:
    """The key of one context (its tokens oldest first), in plain Python: the reference."""
    key = 0
    for k, token in enumerate(reversed(context), start=1):
        key = key + token * vocab ** (k - 1) if k <= exact_orders(vocab) else key * HASH_MULTIPLIER + token + 1
    return key & MASK64


def context_keys(tokens: np.ndarray, order: int, vocab: int) -> np.ndarray:
    """Per position t, the key of the ``order`` tokens before it (uint64); positions t < order
    have no full context and get a partial key (callers mask them)."""
    tokens = np.asarray(tokens, dtype=np.uint64)
    keys = np.zeros(len(tokens), dtype=np.uint64)
    for i in range(1, min(order, len(tokens)) + 1):
        keys[i:] = extend_keys(keys[i:], tokens[:len(tokens) - i], i, vocab)
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
    def count(cls, tokens: "np.ndarray | list[np.ndarray]", vocab: int, max_order: int = DEFAULT_ORDERS,
              smoothing: str = "witten-bell", discount: float = 0.75, context: int = 0) -> "NgramCache":
        """The counts of every order 0..max_order over one token stream, or over several streams
        (a list: no context crosses from one into the next). The first ``context`` tokens of each
        stream are context only: neither counted nor followers, so a stream cut into parts that
        each start with the ``max_order`` tokens before them counts, merged, as the whole."""
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        streams = [np.asarray(t, dtype=np.int64) for t in ([tokens] if isinstance(tokens, np.ndarray) else tokens)]
        streams = streams or [np.zeros(0, np.int64)]  # no streams: empty counts
        for stream in streams:
            if len(stream) and (stream.min() < 0 or stream.max() >= vocab):
                raise ValueError(f"tokens must be in [0, {vocab})")
        unigram = sum((np.bincount(s[context:], minlength=vocab) for s in streams),
                      np.zeros(vocab, np.int64)).astype(np.int64)
        orders = []
        for k in range(1, max_order + 1):
            pairs = [stream_pairs(s, k, vocab, max(k, context)) for s in streams]
            orders.append(reduce_pairs(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])))
        return cls(vocab, unigram, orders, smoothing, discount)

    @classmethod
    def merged(cls, caches: "list[NgramCache]") -> "NgramCache":
        """One cache with the summed counts of ``caches`` (same vocabulary, orders and smoothing):
        counting a stream in parts and merging equals counting it whole (when each part keeps the
        tokens before it as context, see ``count``)."""
        first = caches[0]
        for other in caches[1:]:
            if (other.vocab, other.max_order, other.smoothing, other.discount) != (
                    first.vocab, first.max_order, first.smoothing, first.discount):
                raise ValueError("only caches of the same vocabulary, orders and smoothing merge")
        unigram = np.sum([c.unigram for c in caches], axis=0).astype(np.int64)
        return cls(first.vocab, unigram, [merge_tables([c.orders[k] for c in caches], first.vocab)
                                          for k in range(first.max_order)], first.smoothing, first.discount)

    # -- the distribution ----------------------------------------------------------------
    def distribution(self, tokens: np.ndarray, positions: np.ndarray | None = None,
                     leave_one_out: bool = False, online: "NgramCache | None" = None) -> torch.Tensor:
        """p_K(. | context) (float64, (P, V)) at ``positions`` of the stream ``tokens`` (default: all),
        each from the tokens before it. ``leave_one_out``: ``tokens`` is the counted stream itself,
        and each position's own occurrence is taken out of the counts first. ``online``: a second
        cache whose counts add to these (the tokens already scored, see ``seedbed.cachemix``)."""
        return self.chain(tokens, positions, leave_one_out, online)[0][:, -1]

    def chain(self, tokens: np.ndarray, positions: np.ndarray | None = None, leave_one_out: bool = False,
              online: "NgramCache | None" = None, available: np.ndarray | None = None, online_weight: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every order's distribution p_0 .. p_K (float64, (P, K + 1, V)), and per position and
        order k = 1..K what a mixer may weigh it by (float64, (P, K, 2)): log(1 + n_k(c)) and the
        escape weight u_k(c) / (n_k(c) + u_k(c)), both 0 for a context never seen (escape 1).
        ``available``: per position, how many of the tokens before it are its context (default:
        all, ``positions``), for several streams laid end to end. ``online_weight``: what one online
        count weighs against a trained one."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.arange(len(tokens)) if positions is None else np.asarray(positions, dtype=np.int64)
        available = positions if available is None else np.minimum(available, positions)
        if online is not None and (online.vocab != self.vocab or online.max_order < self.max_order):
            raise ValueError("the online cache must have the same vocabulary and at least as many orders")
        sources = [(self, 1.0)] if online is None else [(self, 1.0), (online, online_weight)]
        targets = tokens[positions]
        rows = np.arange(len(positions))
        unigram = np.broadcast_to(sum(weight * c.unigram for c, weight in sources).astype(np.float64),
                                  (len(positions), self.vocab)).copy()
        if leave_one_out:
            unigram[rows, targets] -= 1
        out = torch.empty(len(positions), self.max_order + 1, self.vocab, dtype=torch.float64)
        out[:, 0] = torch.from_numpy((unigram + 1) / (unigram.sum(1, keepdims=True) + self.vocab))
        confidence = np.zeros((len(positions), self.max_order, 2))
        confidence[:, :, 1] = 1.0
        # The keys of the scored positions only, one order longer each time round (as context_keys
        # builds them): a chunk of a long stream costs its own length, not the stream's.
        keys = np.zeros(len(positions), dtype=np.uint64)
        for k in range(1, self.max_order + 1):
            has_context = available >= k
            keys[has_context] = extend_keys(keys[has_context], tokens[positions[has_context] - k], k, self.vocab)
            counts = np.zeros((len(positions), self.vocab))
            for source, weight in sources:
                source.orders[k - 1].add_counts(keys, has_context, counts, weight)
            if leave_one_out:
                counts[rows[has_context], targets[has_context]] -= 1
            n = counts.sum(1)
            u = (counts > 0).sum(1).astype(np.float64)
            out[:, k] = out[:, k - 1]
            # A context seen only at this very position is, left out, a context never seen.
            seen = n > 0
            at, n, u = rows[seen], n[seen], u[seen]
            if len(at):
                n_cv = torch.from_numpy(counts[seen])
                n_t, u_t = torch.from_numpy(n)[:, None], torch.from_numpy(u)[:, None]
                lower = out[at, k - 1]
                if self.smoothing == "absolute":
                    out[at, k] = ((n_cv - self.discount).clamp(min=0) + self.discount * u_t * lower) / n_t
                else:
                    out[at, k] = (n_cv + u_t * lower) / (n_t + u_t)
                confidence[at, k - 1, 0] = np.log1p(n)
                confidence[at, k - 1, 1] = u / (n + u)
        return out, torch.from_numpy(confidence)

    # -- storage -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The counts, compactly: per order the context keys as gaps, each context's number of
        followers, the followers and their counts, every array split into byte planes (the
        high bytes of small numbers are runs of zeros) and the whole LZMA-compressed.

        Layout: header (``HEADER``: magic, version, smoothing, orders, vocab, discount, raw
        length, CRC32 of the raw bytes), then LZMA of: unigram (u64 x V), and per order C, F (u64
        each) and the width of its counts in bytes (u8), key gaps (u64 x C), followers per
        context (C), followers (F), counts (F), each in the narrowest unsigned type that holds
        it (V for the followers per context, V - 1 for the followers) and as byte planes.
        """
        token_type, distinct_type = narrowest(self.vocab - 1), narrowest(self.vocab)
        parts = [planes(self.unigram, np.uint64)]
        for table in self.orders:
            gaps = np.diff(table.keys, prepend=np.uint64(0))
            count_type = narrowest(int(table.counts.max()) if len(table.counts) else 0)
            parts += [struct.pack("<QQB", len(table.keys), len(table.tokens), np.dtype(count_type).itemsize),
                      planes(gaps, np.uint64), planes(table.distinct, distinct_type),
                      planes(table.tokens, token_type), planes(table.counts, count_type)]
        raw = b"".join(parts)
        header = HEADER.pack(MAGIC, VERSION, SMOOTHINGS.index(self.smoothing), self.max_order, self.vocab,
                             self.discount, len(raw), zlib.crc32(raw))
        return header + lzma.compress(raw, preset=9)

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "n-gram cache") -> "NgramCache":
        """``to_bytes`` read back, every field checked before it is used (UserError if not)."""
        def bad(why: str) -> UserError:
            return UserError(f"{where} is corrupted ({why})")

        if len(blob) < HEADER.size or blob[:4] != MAGIC:
            raise bad("bad magic or too short")
        _, version, smoothing, max_order, vocab, discount, raw_len, crc = HEADER.unpack_from(blob)
        if version != VERSION:
            raise UserError(f"{where} has format version {version}; this seedbed reads version {VERSION}")
        if smoothing >= len(SMOOTHINGS) or not 1 <= max_order <= MAX_ORDER or not 2 <= vocab <= 1 << 20 \
                or not 0 < discount <= 1:
            raise bad("header fields out of range")
        decompressor = lzma.LZMADecompressor()
        try:
            raw = decompressor.decompress(blob[HEADER.size:], max_length=raw_len + 1)
        except lzma.LZMAError:
            raise bad("its counts do not decompress") from None
        if not decompressor.eof or decompressor.unused_data:
            raise bad("truncated or trailing bytes")
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise bad("checksum mismatch")
        reader = PlaneReader(raw, bad)
        token_type, distinct_type = narrowest(vocab - 1), narrowest(vocab)
        unigram = reader.array(vocab, np.uint64).astype(np.int64)
        orders = []
        for _ in range(max_order):
            n_contexts, n_followers, count_width = reader.sizes()
            if count_width not in (1, 2, 4, 8):
                raise bad("count width out of range")
            keys = np.cumsum(reader.array(n_contexts, np.uint64), dtype=np.uint64)
            distinct = reader.array(n_contexts, distinct_type).astype(np.int64)
            tokens = reader.array(n_followers, token_type).astype(np.int64)
            counts = reader.array(n_followers, np.dtype(f"u{count_width}")).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(distinct)]).astype(np.int64)
            if (n_contexts and (distinct.min() < 1 or (n_contexts > 1 and (np.diff(keys) == 0).any())
                                or (keys[1:] < keys[:-1]).any())) or offsets[-1] != n_followers:
                raise bad("context table out of order")
            if n_followers and (tokens.max() >= vocab or counts.min() < 1):
                raise bad("follower out of range")
            in_context = np.ones(n_followers, bool)
            in_context[offsets[:-1][distinct > 0]] = False
            if (np.diff(tokens, prepend=-1)[in_context] <= 0).any():
                raise bad("followers out of order")
            totals = np.add.reduceat(counts, offsets[:-1]) if n_contexts else np.zeros(0, np.int64)
            orders.append(OrderTable(keys, offsets, tokens, counts, totals.astype(np.int64)))
        if not reader.done():
            raise bad("trailing bytes")
        return cls(vocab, unigram, orders, SMOOTHINGS[smoothing], discount)

    def distribution_reference(self, tokens: list[int], t: int, leave_one_out: bool = False) -> list[float]:
        """p_K(. | tokens[:t]), one position at a time in plain Python (for the tests)."""
        own = int(tokens[t]) if leave_one_out else -1
        unigram = [int(n) - (v == own) for v, n in enumerate(self.unigram)]
        probs = [(unigram[v] + 1) / (sum(unigram) + self.vocab) for v in range(self.vocab)]
        for k, table in enumerate(self.orders, start=1):
            if t < k:
                break
            key = context_key([int(x) for x in tokens[t - k:t]], self.vocab)
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


def stream_pairs(tokens: np.ndarray, k: int, vocab: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """(context key, follower) of order k at every position t >= ``first`` (>= k) of one stream."""
    return context_keys(tokens, k, vocab)[first:], tokens[first:]


def merge_tables(tables: list[OrderTable], vocab: int) -> OrderTable:
    """One order's tables with their counts summed. Each (context, follower) pair becomes the one
    integer rank(context) V + follower, already ascending within each table, so a stable sort of
    the tables laid end to end merges sorted runs: a large table and a few new counts merge in
    about the large table's length (how the online cache grows, ``seedbed.adapt``)."""
    keys = np.unique(np.concatenate([t.keys for t in tables]))
    pairs = np.concatenate([np.repeat(np.searchsorted(keys, t.keys).astype(np.int64) * vocab, t.distinct) + t.tokens
                            for t in tables])
    counts = np.concatenate([t.counts for t in tables])
    order = np.argsort(pairs, kind="stable")
    pairs, counts = pairs[order], counts[order]
    starts = np.flatnonzero(np.diff(pairs, prepend=-1))  # the first of each distinct pair
    pairs, counts = pairs[starts], np.add.reduceat(counts, starts) if len(starts) else counts[:0]
    context = pairs // vocab  # every context of the union has a follower, so these are 0..C-1 in order
    offsets = np.searchsorted(context, np.arange(len(keys) + 1)).astype(np.int64)
    totals = np.add.reduceat(counts, offsets[:-1]) if len(keys) else np.zeros(0, np.int64)
    return OrderTable(keys, offsets, (pairs % vocab).astype(np.int64), counts.astype(np.int64), totals.astype(np.int64))


def reduce_pairs(keys: np.ndarray, followers: np.ndarray, weights: np.ndarray | None = None) -> OrderTable:
    """An order's table from (context key, follower) pairs, each counted ``weights`` times (default once)."""
    order = np.lexsort((followers, keys))
    keys, followers = keys[order], followers[order]
    weights = np.ones(len(keys), np.int64) if weights is None else np.asarray(weights, np.int64)[order]
    new_pair = np.ones(len(keys), dtype=bool)
    new_pair[1:] = (keys[1:] != keys[:-1]) | (followers[1:] != followers[:-1])
    pair_starts = np.flatnonzero(new_pair)
    pair_keys, pair_tokens = keys[pair_starts], followers[pair_starts]
    pair_counts = np.add.reduceat(weights, pair_starts) if len(pair_starts) else np.zeros(0, np.int64)
    new_context = np.ones(len(pair_keys), dtype=bool)
    new_context[1:] = pair_keys[1:] != pair_keys[:-1]
    context_starts = np.flatnonzero(new_context)
    offsets = np.append(context_starts, len(pair_keys)).astype(np.int64)
    totals = np.add.reduceat(pair_counts, context_starts) if len(context_starts) else np.zeros(0, dtype=np.int64)
    return OrderTable(pair_keys[context_starts], offsets, pair_tokens.astype(np.int64), pair_counts.astype(np.int64),
                      totals.astype(np.int64))


def narrowest(largest: int):
    """The narrowest unsigned integer type that holds 0..``largest``."""
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if largest <= np.iinfo(t).max)


def planes(values: np.ndarray, dtype) -> bytes:
    """``values`` as ``dtype`` little-endian, byte plane by byte plane (all lowest bytes first)."""
    array = np.ascontiguousarray(np.asarray(values).astype(np.dtype(dtype).newbyteorder("<")))
    return array.view(np.uint8).reshape(len(array), -1).T.tobytes()


class PlaneReader:
    """Reads ``planes`` arrays back in order, refusing to run past the end."""

    def __init__(self, raw: bytes, bad):
        self.raw, self.at, self.bad = raw, 0, bad

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.raw):
            raise self.bad("sizes run past the end")
        self.at += n
        return self.raw[self.at - n:self.at]

    def sizes(self) -> tuple[int, int, int]:
        return struct.unpack("<QQB", self.take(17))

    def array(self, count: int, dtype) -> np.ndarray:
        width = np.dtype(dtype).itemsize
        if count > len(self.raw):  # a size no payload of this length can hold
            raise self.bad("sizes run past the end")
        data = np.frombuffer(self.take(count * width), np.uint8).reshape(width, count).T
        return np.ascontiguousarray(data).view(np.dtype(dtype).newbyteorder("<"))[:, 0].astype(dtype)

    def done(self) -> bool:
        return self.at == len(self.raw)
