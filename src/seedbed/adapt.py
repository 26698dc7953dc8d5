"""Scoring in coding order, with the n-gram cache and score-first adaptation (dynamic evaluation).

The text's tokens are cut into S streams (segments) scored side by side, position p of every
stream at once, exactly as ``seedbed compress`` codes them: ``StreamScorer`` gives the
distribution of the next token of every stream, the coder (or ``seedbed eval --adapt``, which
only adds up -log2 p) uses it, and ``feed`` hands over the true tokens. So compress and eval
see the same distributions, and the coded size is the evaluated bits to within the coder's
rounding.

Adaptation, every ``every`` positions (S x ``every`` tokens), after those tokens are scored:

- cache: the online n-gram cache counts every token scored so far (each stream its own
  segment; the new tokens are counted and merged in); its counts add to the trained ones at
  lookup, and its orders alone are more sources of the gate (``seedbed.cachemix``, "Online
  sources");
- mixer: the gate, widened to the online sources and extended to read the text context
  (``seedbed.cachemix``, "Text context"), is refitted (``mixer_iterations`` L-BFGS iterations from its current
  value) to the last ``REFIT_TOKENS`` tokens scored, each with the sources' probabilities it
  was scored with (a window: the text's recent part, at a bounded cost per update);
- model (``model_lr`` > 0): one Adam step on the model's cross-entropy of the tokens just
  scored (each stream's last ``every`` targets, with up to 3 x ``every`` tokens before them
  as context, within the model's context), in
  eval mode (no dropout or sampling: a deterministic update), then the incremental state is
  rebuilt from the new weights.

Nothing learns from a token before it has been scored: an update at position p uses tokens
< p, and the distributions at positions >= p come after it. Encoder and decoder run the same
updates on the same tokens in the same order, so (same machine kind, same torch) they stay
bit-identical; the compressed file's header records the options.
"""

from __future__ import annotations

import collections
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from seedbed.cachemix import ONLINE_WEIGHT, CacheMixer, TextCache, TextContext, gate_features, online_orders
from seedbed.errors import UserError
from seedbed.eval import EvalResult, check_normalised
from seedbed.ngram import NgramCache


REFIT_TOKENS = 65536  # the gate is refitted to the last this many scored tokens


@dataclass(frozen=True)
class AdaptOptions:
    # Measured on the 10-minute gpt model (val, K = 8): every 16 beat 8 and 32; lr 5e-4 beat 3e-4, 7e-4,
    # 1e-3 and 1.5e-3; 10 gate iterations beat 5.
    every: int = 16  # positions per stream between updates
    mixer_iterations: int = 10  # L-BFGS iterations refitting the gate per update (0: keep it)
    model_lr: float = 5e-4  # Adam learning rate of the model's update (0: the model stays as trained)

    def check(self) -> None:
        if not 1 <= self.every <= 65535:
            raise UserError(f"--adapt-every must be in 1..65535, got {self.every}")
        if not 0 <= self.mixer_iterations <= 65535:
            raise UserError(f"--adapt-mixer-iterations must be in 0..65535, got {self.mixer_iterations}")
        if not (math.isfinite(self.model_lr) and 0 <= self.model_lr < 1):
            raise UserError(f"--adapt-lr must be in [0, 1), got {self.model_lr}")


class StreamScorer:
    """Next-token distributions for ``streams`` segments in coding order (see the module docstring)."""

    def __init__(self, model, streams: int, stride: int, cache: TextCache | None = None,
                 adapt: AdaptOptions | None = None, length: int = 0, surfaces: list[bytes] | None = None):
        """``surfaces``: the bytes of every token id (``Tokenizer.surfaces``), needed with a cache and adaptation."""
        if adapt is not None and adapt.model_lr > 0:
            # The caller's model stays as it was; every weight of the copy learns, also those a
            # composed model keeps frozen (a PHATGOOSE base, CALM's two models).
            model = copy.deepcopy(model).requires_grad_(True)
        self.text_context = None
        if cache is not None:  # the gate refits; with adaptation it also weighs the online sources and the text context
            order, mixer = cache.ngram.max_order, cache.mixer
            if adapt is not None:
                if surfaces is None or len(surfaces) != model.cfg.vocab_size:
                    raise ValueError("adapting with a cache needs the surface bytes of every token id")
                self.text_context = TextContext(list(surfaces))
                mixer = mixer.widened(order, online_orders(order)).extended(TextContext.FEATURES)
            cache = TextCache(cache.ngram, CacheMixer(mixer.weights.clone()))
        self.model, self.streams, self.cache, self.adapt = model, streams, cache, adapt
        self.vocab = model.cfg.vocab_size
        self.context = model.cfg.max_seq_len
        self.keep = self.context - stride + 1  # tokens kept when the window slides
        self.rows = np.zeros((streams, max(length, 1)), np.int64)
        self.real_length = np.zeros(streams, np.int64)  # real tokens fed per stream (the last may stop early)
        self.position = 0
        self.state, self.filled, self.rebuild = None, 0, False
        self.online = (NgramCache.count([], self.vocab, online_orders(cache.ngram.max_order))  # nothing scored yet
                       if cache is not None and adapt is not None else None)
        self.counted = 0  # positions counted into ``online``
        # Per scored position, each source's probability of its target and the gate's features:
        # the last REFIT_TOKENS of them are what the gate is refitted to.
        self.scored: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque()
        self.scored_rows = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this position's sources and features
        self.optimizer = (torch.optim.Adam(model.parameters(), lr=adapt.model_lr)
                          if adapt is not None and adapt.model_lr > 0 else None)

    @torch.no_grad()
    def model_log_probs(self) -> torch.Tensor:
        """The model's log p(. | stream so far) (float64, (S, V))."""
        p = self.position
        if self.state is None or self.filled == self.context or self.rebuild:
            start = max(0, p - self.keep) if (self.state is not None or self.rebuild) else 0
            self.state = self.model.init_state(self.streams, self.context)
            logits, self.state = self.model.step(torch.from_numpy(self.rows[:, start:p]), self.state)
            self.filled, self.rebuild = p - start, False
        else:
            logits, self.state = self.model.step(torch.from_numpy(self.rows[:, p - 1:p]), self.state)
            self.filled += 1
        return torch.log_softmax(logits[:, -1].double(), -1)

    def next_probs(self) -> torch.Tensor:
        """p(next token of every stream | its tokens so far) (float64, (S, V)); uniform at position 0."""
        if self.position == 0:
            self.pending = None
            return torch.full((self.streams, self.vocab), 1.0 / self.vocab, dtype=torch.float64)
        log_probs = self.model_log_probs()
        if self.cache is None:
            return log_probs.exp()
        order = self.online.max_order if self.online is not None else self.cache.ngram.max_order
        p = self.position
        # Each stream's last K (or J) tokens and a slot for the next, laid end to end.
        width = order + 1
        window = np.zeros((self.streams, width), np.int64)
        take = min(p, order)
        window[:, order - take:order] = self.rows[:, p - take:p]
        positions = np.arange(self.streams) * width + order
        available = np.full(self.streams, take)
        chain, confidence = self.cache.ngram.chain(window.reshape(-1), positions, online=self.online,
                                                   available=available, online_weight=ONLINE_WEIGHT)
        if self.online is not None:
            own, own_confidence = self.online.chain(window.reshape(-1), positions, available=available)
            chain, confidence = torch.cat([chain, own], 1), torch.cat([confidence, own_confidence], 1)
        features = gate_features(log_probs, chain, confidence)
        if self.text_context is not None:
            features = torch.cat([features, self.text_context.features(window[:, :order], available)], 1)
        probs = self.cache.mixer.mix_with(features, log_probs, chain)
        if self.adapt is not None and self.adapt.mixer_iterations:
            self.pending = (torch.cat([log_probs.exp()[:, None], chain], 1), features)
        return probs

    def feed(self, tokens: np.ndarray, real: np.ndarray) -> None:
        """The true next token of every stream (``real``: the streams that had one)."""
        p = self.position
        self.rows[:, p] = tokens
        self.real_length[real] = p + 1
        if self.pending is not None:
            everything, features = self.pending
            index = torch.from_numpy(np.asarray(tokens, np.int64))[:, None, None].expand(-1, everything.shape[1], 1)
            mask = torch.from_numpy(real)
            self.scored.append((everything.gather(-1, index)[..., 0][mask], features[mask]))
            self.scored_rows += int(mask.sum())
            while self.scored_rows - len(self.scored[0][0]) >= REFIT_TOKENS:
                self.scored_rows -= len(self.scored.popleft()[0])
        self.position = p + 1
        if self.adapt is not None and self.position % self.adapt.every == 0:
            self.update()

    def update(self) -> None:
        p = self.position
        if self.cache is not None:
            # The tokens scored since the last update, each stream's J tokens before them as context
            # only, merged into the online counts: equal to counting everything scored (tested).
            order, since = self.online.max_order, self.counted
            start = max(0, since - order)
            segments = [self.rows[j, start:self.real_length[j]] for j in range(self.streams)]
            scored = NgramCache.count(segments, self.vocab, order, context=since - start)
            self.online, self.counted = NgramCache.merged([self.online, scored]), p
            if self.adapt.mixer_iterations and self.scored:
                self.cache.mixer = self.cache.mixer.fitted(torch.cat([sources for sources, _ in self.scored]),
                                                           torch.cat([features for _, features in self.scored]),
                                                           self.adapt.mixer_iterations)
        if self.optimizer is not None and p >= 2:
            # The tokens just scored and up to three times as many before them as context: a model
            # of long context would otherwise run a whole window per stream for each update.
            window = min(p - 1, self.context, 4 * self.adapt.every)
            scored = min(self.adapt.every, window)
            inputs = torch.from_numpy(self.rows[:, p - 1 - window:p - 1])
            targets = torch.from_numpy(self.rows[:, p - window:p].copy())
            targets[:, :window - scored] = -100  # context only: the tokens just scored are the last ones
            targets[torch.from_numpy(np.arange(p - window, p)[None, :] >= self.real_length[:, None])] = -100
            self.model.eval()
            with torch.enable_grad():
                loss = F.nll_loss(self.model.log_probs(inputs).reshape(-1, self.vocab).float(), targets.reshape(-1),
                                  ignore_index=-100)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            self.rebuild = True


def score_streams(model, tokens: np.ndarray, n_bytes: int, streams: int, stride: int,
                  cache: TextCache | None, adapt: AdaptOptions | None, surfaces: list[bytes] | None = None) -> EvalResult:
    """``seedbed eval --adapt``: the bits ``seedbed compress`` would spend, without the coder."""
    from seedbed.codec import code_positions, pick_streams, segment

    start = time.perf_counter()
    tokens = np.asarray(tokens, np.int64)
    streams = pick_streams(len(tokens), streams)
    rows, length = segment(tokens, streams)
    scorer = StreamScorer(model, streams, stride, cache, adapt, length, surfaces)
    bits = 0.0
    for p, real in code_positions(streams, length, len(tokens)):
        probs = scorer.next_probs()
        check_normalised(probs.log())
        picked = probs[torch.from_numpy(real), torch.from_numpy(rows[real, p])]
        bits -= torch.log2(picked).sum().item()
        scorer.feed(rows[:, p], real)
    return EvalResult(bits=bits, tokens=len(tokens), n_bytes=n_bytes, seconds=time.perf_counter() - start)
