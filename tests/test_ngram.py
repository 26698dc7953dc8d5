"""The n-gram cache (ngram.py): counts, a distribution normalised everywhere, causal, equal to the plain reference."""

import numpy as np
import pytest
import torch

from seedbed.errors import UserError
from seedbed.ngram import SMOOTHINGS, NgramCache, context_key, context_keys, exact_orders


def stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A stream with repeats (so that high orders are seen more than once) and noise."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(0, vocab, 7)
    return np.where(rng.random(n) < 0.7, np.resize(motif, n), rng.integers(0, vocab, n))


def test_counts_cover_every_pair_once():
    tokens = stream(500, 5)
    cache = NgramCache.count(tokens, 5, max_order=4)
    assert int(cache.unigram.sum()) == 500
    for k, table in enumerate(cache.orders, start=1):
        assert int(table.counts.sum()) == int(table.totals.sum()) == 500 - k
        assert bool((np.diff(table.keys.astype(np.float64)) > 0).all())  # sorted, unique
        pairs = {}
        keys = context_keys(tokens, k, 5)
        for t in range(k, 500):
            pairs[(int(keys[t]), int(tokens[t]))] = pairs.get((int(keys[t]), int(tokens[t])), 0) + 1
        stored = {(int(table.keys[c]), int(table.tokens[f])): int(table.counts[f])
                  for c in range(len(table.keys)) for f in range(table.offsets[c], table.offsets[c + 1])}
        assert stored == pairs


@pytest.mark.parametrize("smoothing", ["witten-bell", "absolute"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_distribution_equals_the_reference(leave_one_out, smoothing):
    counted = stream(400, 5)
    cache = NgramCache.count(counted, 5, max_order=3, smoothing=smoothing, discount=0.6)
    scored = counted if leave_one_out else stream(120, 5, seed=1)  # unseen text: some contexts never seen
    probs = cache.distribution(scored, leave_one_out=leave_one_out)
    for t in range(len(scored)):
        expected = torch.tensor(cache.distribution_reference(scored.tolist(), t, leave_one_out), dtype=torch.float64)
        torch.testing.assert_close(probs[t], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("vocab, order", [(256, 8), (256, 12), (1024, 6), (1024, 9), (1000, 7)])
def test_context_keys_equal_the_reference_and_every_token_counts(vocab, order):
    """Exact up to V^k <= 2^64, hashed beyond: either way every token of the context moves the
    key (a plain polynomial modulo 2^64 would drop x[t-9] and older for bytes, and more than
    the low 4 bits of x[t-7] for a vocabulary of 1024)."""
    assert (exact_orders(256), exact_orders(1024), exact_orders(1000)) == (8, 6, 6)
    tokens = stream(300, vocab)
    keys = context_keys(tokens, order, vocab)
    for t in range(order, len(tokens)):
        assert int(keys[t]) == context_key(tokens[t - order:t].tolist(), vocab)
    context = tokens[:order].tolist()
    for place in range(order):  # each place, the oldest included, with every other token there
        variants = {context_key(context[:place] + [v] + context[place + 1:], vocab) for v in range(vocab)}
        assert len(variants) == vocab, place


def test_hashed_orders_equal_the_reference():
    """Orders beyond the exact ones (here 8 over 1024 tokens) through chain and the plain reference;
    the context's oldest token decides the follower, so only orders 7 and 8 can predict it."""
    first = np.random.default_rng(3).integers(0, 10, 400)
    # Blocks of 9: a random a in 0..9, the same 7 filler tokens, then 1000 + a.
    tokens = np.concatenate([[a, *range(500, 507), 1000 + a] for a in first])
    cache = NgramCache.count(tokens, 1024, max_order=8)
    probs = cache.distribution(tokens)
    for t in (8 + 9 * 50, 8 + 9 * 300, 1000):
        expected = torch.tensor(cache.distribution_reference(tokens.tolist(), t), dtype=torch.float64)
        torch.testing.assert_close(probs[t], expected, rtol=1e-12, atol=1e-15)
    ends = np.arange(8 + 9 * 100, len(tokens), 9)
    assert probs[ends, tokens[ends]].mean() > 0.9  # order 7 alone would give each of the ten about 1/10


def test_leave_one_out_of_a_single_occurrence_falls_back_to_the_lower_order():
    tokens = np.array([0, 1, 2, 3, 0, 1, 2, 4])  # the context (1, 2) of t=3 and t=7 was seen twice
    cache = NgramCache.count(tokens, 5, max_order=2)
    kept = cache.distribution(tokens, leave_one_out=True)
    # At t=7, left out, (1, 2) was followed once, by 3: that order puts mass on 3, and 4 only
    # through the lower orders.
    assert kept[7, 3] > kept[7, 4] > 0


@pytest.mark.parametrize("vocab, max_order, smoothing", [(256, 7, "witten-bell"), (256, 7, "absolute"),
                                                         (1024, 8, "witten-bell")])  # 1024^7 > 2^64: hashed keys
def test_distribution_is_normalised_everywhere(default_dataset, vocab, max_order, smoothing):
    text = default_dataset.train.tokens[:50_000].astype(np.int64)  # real text, bytes
    tokens = text if vocab == 256 else (text * 7 + np.roll(text, 1)) % vocab
    cache = NgramCache.count(tokens[:40_000], vocab, max_order=max_order, smoothing=smoothing)
    for scored in (tokens[40_000:44_000], tokens[:4_000]):
        probs = cache.distribution(scored)
        assert probs.shape == (len(scored), vocab) and bool((probs > 0).all())
        assert float((probs.sum(-1) - 1).abs().max()) < 1e-12


def test_the_cache_never_reads_the_token_it_predicts_or_later():
    counted = stream(600, 6)
    cache = NgramCache.count(counted, 6, max_order=4)
    scored = stream(80, 6, seed=2)
    before = cache.distribution(scored)
    for t in (0, 1, 5, 40, 79):
        changed = scored.copy()
        changed[t:] = (changed[t:] + 1) % 6
        after = cache.distribution(changed)
        assert torch.equal(before[:t + 1], after[:t + 1])


def test_counting_is_deterministic_and_rejects_out_of_range_tokens():
    tokens = stream(300, 7)
    first, second = NgramCache.count(tokens, 7, 3), NgramCache.count(tokens, 7, 3)
    assert all(np.array_equal(a.keys, b.keys) and np.array_equal(a.counts, b.counts)
               for a, b in zip(first.orders, second.orders, strict=True))
    with pytest.raises(ValueError, match="tokens must be in"):
        NgramCache.count(np.array([0, 7]), 7)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        NgramCache.count(tokens, 7, smoothing="kneser")
    with pytest.raises(ValueError, match="discount must be in"):
        NgramCache.count(tokens, 7, smoothing="absolute", discount=1.5)


def test_confidence_reports_counts_and_escape_per_order():
    tokens = np.array([0, 1, 2, 3, 0, 1, 2, 4])
    cache = NgramCache.count(tokens, 5, max_order=2)
    _, confidence = cache.chain(np.array([9 % 5, 1, 2, 0]))
    # Position 3 follows (1, 2): order 1 context (2,) and order 2 context (1, 2) were each followed
    # twice, by two distinct tokens (3 and 4): escape 2 / (2 + 2).
    torch.testing.assert_close(confidence[3], torch.tensor([[np.log(3), 0.5], [np.log(3), 0.5]], dtype=torch.float64))
    # Position 1 follows (4,) as order 1 (seen once, by nothing: the stream ends) -> never seen.
    torch.testing.assert_close(confidence[1, 0], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_counting_in_parts_and_merging_equals_counting_whole():
    tokens = stream(3_000, 6)
    whole = NgramCache.count(tokens, 6, max_order=4)
    # Each part after the first starts with the 4 tokens before it, as context only.
    parts = [NgramCache.count(tokens[:1000], 6, 4)] + [NgramCache.count(tokens[lo - 4:lo + 1000], 6, 4, context=4)
                                                       for lo in (1000, 2000)]
    merged = NgramCache.merged([NgramCache.count([], 6, 4)] + parts)  # an empty cache merges as nothing
    assert np.array_equal(merged.unigram, whole.unigram)
    for a, b in zip(merged.orders, whole.orders, strict=True):
        for field in ("keys", "offsets", "tokens", "counts", "totals"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("weight", [1, 3])
def test_an_online_cache_adds_its_counts_to_the_trained_ones(weight):
    """Online counts of weight w equal the online text counted w times into the trained cache."""
    trained, scored = stream(800, 5), stream(300, 5, seed=2)
    cache = NgramCache.count(trained, 5, max_order=3)
    online = NgramCache.count(scored[:200], 5, max_order=3)
    both = NgramCache.merged([cache] + [online] * weight)
    positions = np.arange(200, 300)
    for got, expected in zip(cache.chain(scored, positions, online=online, online_weight=weight),
                             both.chain(scored, positions), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_counting_nothing_gives_empty_counts_and_uniform_distributions():
    empty = NgramCache.count([], 7, max_order=3)
    assert empty.unigram.sum() == 0 and all(len(order.keys) == 0 for order in empty.orders)
    chain, confidence = empty.chain(stream(20, 7), np.arange(20))
    torch.testing.assert_close(chain, torch.full_like(chain, 1 / 7), rtol=1e-12, atol=0)
    assert (confidence[..., 0] == 0).all() and (confidence[..., 1] == 1).all()  # never seen: escape 1


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_storage_round_trips_and_refuses_damage(smoothing):
    cache = NgramCache.count(stream(2_000, 9), 9, max_order=5, smoothing=smoothing, discount=0.6)
    blob = cache.to_bytes()
    back = NgramCache.from_bytes(blob)
    assert (back.vocab, back.max_order, back.smoothing, back.discount) == (9, 5, smoothing, 0.6)
    assert back.to_bytes() == blob
    tokens = stream(300, 9, seed=3)
    torch.testing.assert_close(back.distribution(tokens), cache.distribution(tokens), rtol=0, atol=0)
    for damaged in (blob[:-5], blob[:3], blob[:30] + bytes([blob[30] ^ 1]) + blob[31:], blob + b"\0"):
        with pytest.raises(UserError, match="corrupted"):
            NgramCache.from_bytes(damaged)
