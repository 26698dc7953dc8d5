"""The model mixed with its n-gram cache (cachemix.py) and score-first adaptation (adapt.py):
normalised, causal, equal to a plain reference, stored exactly, coded byte-exact, and never
learning from a token before it is scored."""

import json

import numpy as np
import pytest
import torch

from seedbed.adapt import AdaptOptions, StreamScorer, score_streams
from seedbed.cachemix import CacheMixer, TextCache, TextContext, build_text_cache, gate_features, n_features
from seedbed.codec import artifact_digest, code_positions, compress_bytes, decompress_bytes, segment
from seedbed.data import load_dataset
from seedbed.data.tokenizer import ByteTokenizer
from seedbed.errors import UserError
from seedbed.eval import evaluate_bpb
from seedbed.loaded import LoadedModel
from seedbed.ngram import NgramCache
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import describe, load_artifact, pack_model
from test_train import TINY, needs_torchrun, seedbed, train_under_torchrun

ORDERS = 3


@pytest.fixture(scope="module")
def cached(tiny_model, small_corpus) -> LoadedModel:
    """The tiny model with a cache of its training split (orders 1..3) and a fitted gate."""
    train = load_dataset(str(small_corpus)).train.tokens
    cache = build_text_cache(tiny_model.model, train, 256, ORDERS, fit_tokens=4096)
    return LoadedModel(tiny_model.model, tiny_model.config, tiny_model.tokenizer, tiny_model.path, cache=cache)


@pytest.fixture(scope="module")
def held_out(small_corpus) -> np.ndarray:
    return load_dataset(str(small_corpus)).val.tokens.astype(np.int64)[:3000]


def model_log_probs(model, tokens: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.log_probs(torch.from_numpy(tokens)[None])[0].double()


def test_mixture_equals_the_plain_sum_and_is_normalised(cached, held_out):
    tokens = held_out[:64]
    mixer = CacheMixer(torch.randn(ORDERS + 2, n_features(ORDERS), dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    cache = TextCache(cached.cache.ngram, mixer)
    positions = np.arange(1, len(tokens))
    logp_model = model_log_probs(cached.model, tokens)[:-1]  # row t - 1 predicts token t
    mixed = cache.log_probs(tokens, positions, logp_model).exp()
    ngram = cached.cache.ngram
    chain, confidence = ngram.chain(tokens, positions)
    gates = mixer.gate(gate_features(logp_model, chain, confidence))
    for row, t in enumerate(positions):
        # Each order's distribution from the plain reference: the cache cut to its first k orders.
        orders = [NgramCache(ngram.vocab, ngram.unigram, ngram.orders[:k]).distribution_reference(tokens.tolist(), t)
                  for k in range(ORDERS + 1)]
        sources = [logp_model[row].exp()] + [torch.tensor(p, dtype=torch.float64) for p in orders]
        expected = sum(g * p for g, p in zip(gates[row], sources, strict=True))
        torch.testing.assert_close(mixed[row], expected, rtol=1e-10, atol=1e-14)
    # The model's float32 log-softmax sums to 1 to ~1e-7; the cache and the gate add nothing to that.
    torch.testing.assert_close(mixed.sum(-1), torch.ones(len(positions), dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_widened_gate_weighs_the_trained_sources_as_before(cached, held_out):
    """Widening adds the online sources and features at zero: on any features the trained
    sources' gate logits are unchanged, and the new sources' logits are 0."""
    tokens = held_out[:64]
    positions = np.arange(1, len(tokens))
    mixer = CacheMixer(torch.randn(ORDERS + 2, n_features(ORDERS), dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(1)))
    logp_model = model_log_probs(cached.model, tokens)[:-1]
    chain, confidence = cached.cache.ngram.chain(tokens, positions)
    online_orders = ORDERS + 2
    online = NgramCache.count(held_out[:32], 256, online_orders)
    own, own_confidence = online.chain(tokens, positions)
    wide_features = gate_features(logp_model, torch.cat([chain, own], 1), torch.cat([confidence, own_confidence], 1))
    wide = mixer.widened(ORDERS, online_orders)
    assert wide.weights.shape == (ORDERS + online_orders + 3, wide_features.shape[1])
    logits = wide_features @ wide.weights.T
    torch.testing.assert_close(logits[:, :ORDERS + 2], gate_features(logp_model, chain, confidence) @ mixer.weights.T,
                               rtol=1e-12, atol=1e-12)
    assert (logits[:, ORDERS + 2:] == 0).all()
    with pytest.raises(ValueError, match="widens"):
        wide.widened(ORDERS, online_orders)


def test_the_extended_gate_mixes_as_before(cached, held_out):
    """Extending adds the text-context columns at zero: whatever they read, the mixture is unchanged."""
    tokens = held_out[:64]
    positions = np.arange(1, len(tokens))
    logp_model = model_log_probs(cached.model, tokens)[:-1]
    chain, confidence = cached.cache.ngram.chain(tokens, positions)
    extra = torch.rand(len(positions), TextContext.FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    features = torch.cat([gate_features(logp_model, chain, confidence), extra], 1)
    torch.testing.assert_close(cached.cache.mixer.extended(TextContext.FEATURES).mix_with(features, logp_model, chain),
                               cached.cache.mixer.mix(logp_model, chain, confidence), rtol=1e-8, atol=1e-8)


def text_context_rows(surfaces: list[bytes], tokens: np.ndarray, width: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """The vectorised text-context features at every position of ``tokens``, and the plain reading of
    the decoded text before each."""
    window = np.zeros((len(tokens), width), np.int64)
    for t in range(len(tokens)):
        take = min(t, width)
        window[t, width - take:] = tokens[t - take:t]
    fast = TextContext(surfaces).features(window, np.minimum(np.arange(len(tokens)), width))
    text = [b"".join(surfaces[v] for v in tokens[:t]) for t in range(len(tokens))]
    return fast, np.stack([TextContext.reference(before) for before in text])


def test_text_context_features_equal_the_plain_reading_of_the_text():
    text = b"KING HENRY.\n  Now, 'tis 42 (yes)--done! Extraordinarily\tlong words: Antigonus.\n\nLEONTES.\nAy."
    tokenizer = ByteTokenizer()
    fast, plain = text_context_rows(tokenizer.surfaces, tokenizer.encode(text).astype(np.int64))
    assert np.array_equal(fast.numpy(), plain)
    assert (fast.sum(1) == 3).all() and set(fast[:, 2 * TextContext.CLASSES:].argmax(1).tolist()) == set(range(7))


def test_mixture_never_reads_the_future(cached, held_out):
    tokens = held_out[:300]
    t = 150
    changed = tokens.copy()
    changed[t:] = (changed[t:] + 1) % 256
    before = evaluate_bpb_rows(cached, tokens)
    after = evaluate_bpb_rows(cached, changed)
    torch.testing.assert_close(before[:t], after[:t], rtol=0, atol=0)  # row t - 1 predicts token t from x_<t
    assert not torch.equal(before[t:], after[t:])


def evaluate_bpb_rows(cached, tokens):
    logp = model_log_probs(cached.model, tokens)[:-1]
    return cached.cache.log_probs(tokens, np.arange(1, len(tokens)), logp)


def test_the_fitted_gate_beats_the_model_and_the_cache_alone(cached, held_out):
    n_bytes = len(held_out)
    context = cached.config.model.max_seq_len
    mixed = evaluate_bpb(cached.model, held_out, n_bytes, context, cache=cached.cache).bpb
    model_alone = evaluate_bpb(cached.model, held_out, n_bytes, context).bpb
    uniform_gate = TextCache(cached.cache.ngram, CacheMixer.uniform(ORDERS))
    cache_mostly = TextCache(cached.cache.ngram, CacheMixer(torch.cat([torch.full((1, n_features(ORDERS)), -30.0),
                                                                      torch.zeros(ORDERS + 1, n_features(ORDERS))]).double()))
    assert mixed < model_alone
    assert mixed < evaluate_bpb(cached.model, held_out, n_bytes, context, cache=uniform_gate).bpb
    assert mixed < evaluate_bpb(cached.model, held_out, n_bytes, context, cache=cache_mostly).bpb


def test_text_cache_storage_round_trips_and_refuses_damage(cached):
    blob = cached.cache.to_bytes()
    back = TextCache.from_bytes(blob)
    assert torch.equal(back.mixer.weights, cached.cache.mixer.weights)
    assert back.to_bytes() == blob
    for damaged in (blob[:-1], blob[:10], blob[:20] + bytes([blob[20] ^ 4]) + blob[21:]):
        with pytest.raises(UserError, match="corrupted"):
            TextCache.from_bytes(damaged)


@pytest.fixture(scope="module")
def cached_artifact(cached, tmp_path_factory):
    path = tmp_path_factory.mktemp("cached") / "cached.seedbed"
    pack_model(cached, path, QuantRule.parse("int8"))
    return path, load_artifact(path), artifact_digest(path)


def test_the_cache_round_trips_through_pack(cached, cached_artifact):
    path, loaded, _ = cached_artifact
    assert loaded.cache.to_bytes() == cached.cache.to_bytes()
    account = describe(path)
    assert f"{len(cached.cache.to_bytes()):>12,}  orders 1..{ORDERS}" in account


@pytest.mark.parametrize("adapt", [None, AdaptOptions(every=64, mixer_iterations=2, model_lr=1e-3)],
                         ids=["cache", "cache+adapt"])
def test_compress_round_trips_and_matches_eval(cached_artifact, small_corpus, adapt):
    _, loaded, digest = cached_artifact
    text = load_text(small_corpus)[:2500 if adapt else 1200]  # adaptation needs updates to gain
    blob, stats = compress_bytes(loaded, digest, text, streams=2, adapt=adapt)
    back, _ = decompress_bytes(loaded, digest, blob)
    assert back == text
    evaluated = loaded.evaluate(text, adapt=adapt, streams=2)
    assert abs(stats.bpb / evaluated.bpb - 1) < 0.01, (stats.bpb, evaluated.bpb)
    alone = loaded.evaluate(text, use_cache=False)
    assert evaluated.bpb < alone.bpb


def load_text(corpus) -> bytes:
    from seedbed.data import load_splits

    _, val, _ = load_splits(str(corpus))
    return b"".join(doc.data for doc in val)[:6000]


@pytest.mark.parametrize("changed_at", [7, 8, 9, 16])  # around the updates after positions 7 and 15
def test_adaptation_never_learns_a_token_before_scoring_it(cached, held_out, changed_at):
    """Two texts that differ only at one stream position: every distribution up to and including
    the one that scores that position must be bit-identical; an update that saw the token before
    it was scored (an off-by-one) would change the distribution at that position."""
    adapt = AdaptOptions(every=8, mixer_iterations=2, model_lr=1e-2)
    streams = 2
    first = held_out[:80]
    second = first.copy()
    stream_length = len(first) // streams
    second[stream_length + changed_at] = (second[stream_length + changed_at] + 7) % 256  # stream 1
    runs = []
    for tokens in (first, second):
        rows, length = segment(tokens, streams)
        scorer = StreamScorer(cached.model, streams, 32, cached.cache, adapt, length, cached.tokenizer.surfaces)
        seen = []
        for p, real in code_positions(streams, length, len(tokens)):
            seen.append(scorer.next_probs())
            scorer.feed(rows[:, p], real)
        runs.append(torch.stack(seen))
    torch.testing.assert_close(runs[0][:changed_at + 1], runs[1][:changed_at + 1], rtol=0, atol=0)
    assert not torch.equal(runs[0][changed_at + 1:], runs[1][changed_at + 1:])


def test_the_online_counts_merged_update_by_update_equal_counting_everything_scored(cached, held_out):
    tokens = held_out[:1003]  # streams of unequal length: the last one stops early
    streams, adapt = 3, AdaptOptions(every=7, mixer_iterations=1, model_lr=0)
    rows, length = segment(tokens, streams)
    scorer = StreamScorer(cached.model, streams, 32, cached.cache, adapt, length, cached.tokenizer.surfaces)
    for p, real in code_positions(streams, length, len(tokens)):
        scorer.next_probs()
        scorer.feed(rows[:, p], real)
    assert scorer.counted == (length // 7) * 7
    scored = [rows[j, :min(scorer.counted, scorer.real_length[j])] for j in range(streams)]
    whole = NgramCache.count(scored, 256, scorer.online.max_order)
    assert np.array_equal(scorer.online.unigram, whole.unigram)
    for a, b in zip(scorer.online.orders, whole.orders, strict=True):
        for field in ("keys", "offsets", "tokens", "counts", "totals"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_adaptation_leaves_the_callers_model_and_gate_alone(cached, held_out):
    before = [p.detach().clone() for p in cached.model.parameters()]
    weights = cached.cache.mixer.weights.clone()
    score_streams(cached.model, held_out[:400], 400, 2, 32, cached.cache, AdaptOptions(every=8, model_lr=1e-2),
                  cached.tokenizer.surfaces)
    assert all(torch.equal(a, b) for a, b in zip(before, cached.model.parameters(), strict=True))
    assert torch.equal(weights, cached.cache.mixer.weights)


def test_generate_samples_from_the_mixture(cached):
    text = cached.generate("ROMEO.", 40, temperature=0.0)
    alone = cached.generate("ROMEO.", 40, temperature=0.0, use_cache=False)
    assert len(text) > 0 and text != alone
    with pytest.raises(UserError, match="no-cache"):
        cached.generate("ROMEO.", 10, draft_layers=1)


def test_cli_trains_a_cache_then_eval_compress_and_no_cache(small_corpus, tmp_path):
    run = tmp_path / "run"
    out = seedbed("train", "--out", str(run), "--steps", "30", "--data", str(small_corpus), "--no-progress", *TINY,
                  "cache.orders=3", "cache.fit_tokens=2000")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = next(r["val_bpb"] for r in records if "val_bpb" in r)
    with_cache = next(r["val_bpb_cache"] for r in records if "val_bpb_cache" in r)
    assert with_cache < val and f"(with the n-gram cache {with_cache:.4f})" in out.stdout
    assert next(r for r in records if "cache_bytes" in r)["cache_bytes"] == (run / "cache.bin").stat().st_size
    evaluated = seedbed("eval", str(run))
    alone = seedbed("eval", str(run), "--no-cache")
    assert f"bpb {with_cache:.4f}" in evaluated.stdout and "model + n-gram cache" in evaluated.stdout
    assert f"bpb {val:.4f}" in alone.stdout and "model alone" in alone.stdout
    assert seedbed("pack", str(run), "-o", str(tmp_path / "m.seedbed"), "--eval-tokens", "-1").returncode == 0
    text = tmp_path / "text.txt"
    text.write_bytes(load_text(small_corpus)[:600])  # 300 positions per stream: 4 updates
    packed = seedbed("compress", str(tmp_path / "m.seedbed"), str(text), "-o", str(tmp_path / "t.sbz"), "--adapt",
                     "--adapt-every", "64", "--streams", "2")
    assert packed.returncode == 0, packed.stderr[-2000:]
    restored = seedbed("decompress", str(tmp_path / "m.seedbed"), str(tmp_path / "t.sbz"), "-o", str(tmp_path / "back"))
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert (tmp_path / "back").read_bytes() == text.read_bytes()
    for bad, message in ((["--adapt", "--adapt-every", "0"], "must be positive"),
                         (["--adapt", "--adapt-lr", "-1"], "--adapt-lr must be in")):
        refused = seedbed("eval", str(run), *bad)
        assert refused.returncode == 2 and refused.stderr.startswith("error:") and message in refused.stderr, \
            refused.stderr
        assert "Traceback" not in refused.stderr


@needs_torchrun
def test_cache_counted_by_two_gloo_ranks_equals_one_process(small_corpus, tmp_path):
    run = tmp_path / "ddp"
    train_under_torchrun(run, small_corpus, 4, "cache.orders=4", "cache.fit_tokens=1000")
    merged = TextCache.from_bytes((run / "cache.bin").read_bytes()).ngram
    whole = NgramCache.count(load_dataset(str(small_corpus)).train.tokens, 256, 4)
    assert np.array_equal(merged.unigram, whole.unigram)
    for a, b in zip(merged.orders, whole.orders, strict=True):
        for field in ("keys", "offsets", "tokens", "counts"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
