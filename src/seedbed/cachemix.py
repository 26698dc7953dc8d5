"""The model mixed with its n-gram cache by a gate that reads only the context.

Sources. At position t the model gives p_M(. | x_<t) and the cache (``ngram.py``) gives every
order's distribution p_0 .. p_K(. | x_<t): S = K + 2 normalised distributions over the
vocabulary.

Gate. A feature vector of the context alone,

    f(t) = [1, log(1 + n_k(c_k)) / 8 for k = 1..K, escape_k(c_k) for k = 1..K,
            H(p_M) / log V, max_v p_M(v), max_v p_k(v) for k = 0..K]       (F = 3K + 4 values)

(how often the cache saw each order's context and how often it escaped from it, how sure the
model and each order are), and weights g(t) = softmax(W f(t)) over the sources, W of shape (S, F). The mixture

    p(v | x_<t) = sum_s g_s(t) p_s(v | x_<t)

is a convex combination of distributions that each sum to 1, so it sums to 1 at every position
(``seedbed eval`` still checks every row). Nothing in it reads x_t or later.

Fitting. W maximises sum_t log p(x_t | x_<t) over the last ``fit_tokens`` positions of the
training stream, with the cache's leave-one-out counts there (each position's own occurrence
taken out: the cache as it will be on unseen text), by L-BFGS from W = 0 (equal weights). The
model has seen that text in training, so it is a little too sure of itself there; the fitted
gate leans slightly to the model, which costs a little, never honesty.

Online sources. While a text is scored with adaptation (``seedbed.adapt``) an online cache
counts the tokens already scored, orders 1..J (J = max(K, ``ONLINE_ORDERS``): it costs no
storage). Its counts of orders 1..K add to the trained ones (each weighing ``ONLINE_WEIGHT``),
and its orders alone are J + 1 more sources, p'_0 .. p'_J: the text repeats itself (a name, a
phrase) more than the training counts can say. The gate then reads the features of both
chains laid side by side,

    f(t) = [1, n_1..n_K, n'_1..n'_J, escape_1..escape_K, escape'_1..escape'_J, H(p_M), max p_M,
            max p_0..max p_K, max p'_0..max p'_J]                         (F = 3K + 3J + 5)

over S = K + J + 3 sources; ``CacheMixer.widened`` adds the new rows and columns at zero to
the trained W, and the adaptation refits it as it scores.

Text context. The adapting gate also reads where in the text it stands (``TextContext``): the
classes of the last two bytes of the text before t (lowercase, uppercase, digit, space,
newline, sentence punctuation, quote / bracket / dash, other: one-hot, 8 + 8 values) and how
many letters end it (the word so far, 0..6, one-hot: 7 values), from the bytes the last tokens
decode to, so a SentencePiece vocabulary reads the same surface as bytes. Which source to trust
differs there: inside a word the online cache completes a name it has seen, after a line break
the model guesses the next speaker. ``CacheMixer.extended`` appends these 23 columns at zero;
measured on the 10-minute gpt model, a gate refitted with them scored 0.0096 bpb lower on the
second half of the val split (0.0095 on test) than one without.

Storage (``TextCache.to_bytes``): magic ``SBCM``, version, S, F (u16 each), W (float64, S x F),
the cache's own bytes (``NgramCache.to_bytes``), and a CRC32 of everything before it.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from seedbed.errors import UserError
from seedbed.ngram import NgramCache

MAGIC = b"SBCM"
VERSION = 1
HEADER = struct.Struct("<4sBHH")  # magic, version, sources, features
CACHE_FILE = "cache.bin"  # in a run folder
COUNT_SCALE = 8.0  # log(1 + n) of a context seen thousands of times is ~8


ONLINE_WEIGHT = 4.0  # one online count weighs four trained ones (measured: 1 and 16 were worse)
ONLINE_ORDERS = 8  # measured: 16 online orders scored worse than 8 on bytes, and slower


def online_orders(max_order: int) -> int:
    """J, the online cache's orders beside a trained cache of ``max_order``."""
    return max(max_order, ONLINE_ORDERS)


def n_features(max_order: int) -> int:
    return 3 * max_order + 4


class TextContext:
    """The text-context features of the module docstring, for a tokenizer's surfaces (bytes per token id)."""

    CLASSES = 8
    WORD = 6  # letters counted at most
    FEATURES = 2 * CLASSES + WORD + 1
    START = 4  # the start of a text reads as a line break

    @staticmethod
    def byte_class(value: int) -> int:
        character = bytes([value])
        if character.islower():
            return 0
        if character.isupper():
            return 1
        if character.isdigit():
            return 2
        return {b" ": 3, b"\n": 4}.get(character, 5 if character in b".,;:!?" else 6 if character in b"'\"()[]-" else 7)

    def __init__(self, surfaces: list[bytes]):
        def last_classes(surface: bytes) -> tuple[int, int]:  # of the last byte and the one before (-1: none)
            classes = [self.byte_class(b) for b in surface[-2:]]
            return (classes[-1] if classes else 7), (classes[0] if len(classes) == 2 else -1)

        self.last, self.second = (np.array(column, np.int64) for column in zip(*map(last_classes, surfaces)))
        letter_bytes = bytes(value for value in range(256) if self.byte_class(value) <= 1)
        letters = [len(surface) - len(surface.rstrip(letter_bytes)) for surface in surfaces]
        self.trailing_letters = np.minimum(np.array(letters, np.int64), self.WORD)
        self.all_letters = np.array([0 < n == len(surface) for n, surface in zip(letters, surfaces)])

    @classmethod
    def reference(cls, before: bytes) -> np.ndarray:
        """The same features (FEATURES,) read plainly from the text ``before`` t."""
        classes = [cls.byte_class(b) for b in before[-2:]]
        classes = [cls.START] * (2 - len(classes)) + classes
        word = 0
        while word < min(cls.WORD, len(before)) and cls.byte_class(before[-1 - word]) <= 1:
            word += 1
        out = np.zeros(cls.FEATURES)
        out[[classes[1], cls.CLASSES + classes[0], 2 * cls.CLASSES + word]] = 1
        return out

    def features(self, window: np.ndarray, available: np.ndarray) -> torch.Tensor:
        """(P, FEATURES) float64 one-hots for contexts ``window`` (P, W): each row's last ``available``
        tokens are the ones before t (the text's start before them), W >= WORD."""
        rows = np.arange(len(window))
        def token(back: int) -> tuple[np.ndarray, np.ndarray]:  # the token ``back`` places before t, and whether it is there
            return window[:, window.shape[1] - back], available >= back
        last, present = token(1)
        first_class = np.where(present, self.last[last], self.START)
        second_class = np.where(present, self.second[last], -1)
        before, there = token(2)
        second_class = np.where(second_class >= 0, second_class, np.where(there, self.last[before], self.START))
        word = np.where(present, self.trailing_letters[last], 0)
        running = present & self.all_letters[last]
        for back in range(2, self.WORD + 1):
            earlier, there = token(back)
            running &= there
            word += np.where(running, self.trailing_letters[earlier], 0)
            running &= self.all_letters[earlier]
        out = np.zeros((len(window), self.FEATURES))
        out[rows, first_class] = 1
        out[rows, self.CLASSES + second_class] = 1
        out[rows, 2 * self.CLASSES + np.minimum(word, self.WORD)] = 1
        return torch.from_numpy(out)


def gate_features(model_log_probs: torch.Tensor, chain: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """f(t) (float64, (P, F)) from the model's log-probabilities (P, V), the cache's chain (P, K+1, V)
    and its confidence (P, K, 2)."""
    log_probs = model_log_probs.double()
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1, keepdim=True) / math.log(log_probs.shape[-1])
    ones = torch.ones(len(log_probs), 1, dtype=torch.float64)
    return torch.cat([ones, confidence[:, :, 0] / COUNT_SCALE, confidence[:, :, 1], entropy,
                      probs.max(-1, keepdim=True).values, chain.max(-1).values], 1)


@dataclass
class CacheMixer:
    weights: torch.Tensor  # (S, F) float64: sources x features

    @classmethod
    def uniform(cls, max_order: int) -> "CacheMixer":
        return cls(torch.zeros(max_order + 2, n_features(max_order), dtype=torch.float64))

    def widened(self, max_order: int, online: int) -> "CacheMixer":
        """This gate (K + 2 sources, 3K + 4 features) with J = ``online`` orders' J + 1 sources and
        their 3J + 1 features added at zero weight (see the module docstring)."""
        k, j = max_order, online
        if self.weights.shape != (k + 2, n_features(k)):
            raise ValueError(f"a gate of {k + 2} x {n_features(k)} widens, not {tuple(self.weights.shape)}")
        wide = torch.zeros(k + j + 3, 3 * k + 3 * j + 5, dtype=self.weights.dtype)
        # The trained columns' places among the widened features: 1 and n_1..n_K, escape_1..escape_K,
        # H and max p_M, max p_0..max p_K.
        columns = [*range(0, 1 + k), *range(1 + k + j, 1 + 2 * k + j), 1 + 2 * k + 2 * j, 2 + 2 * k + 2 * j,
                   *range(3 + 2 * k + 2 * j, 4 + 3 * k + 2 * j)]
        wide[:k + 2, columns] = self.weights
        return CacheMixer(wide)

    def extended(self, columns: int) -> "CacheMixer":
        """This gate reading ``columns`` more features (appended after f(t)), at zero weight."""
        return CacheMixer(torch.cat([self.weights, self.weights.new_zeros(len(self.weights), columns)], 1))

    def gate(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(features @ self.weights.T, -1)

    def mix(self, model_log_probs: torch.Tensor, chain: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """p(. | x_<t) (float64, (P, V)) from the model's log-probabilities (P, V) and the cache's chain (P, K+1, V)."""
        return self.mix_with(gate_features(model_log_probs, chain, confidence), model_log_probs, chain)

    def mix_with(self, features: torch.Tensor, model_log_probs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """The same mixture, the gate's features (P, F) given (computed once by a caller that also keeps them)."""
        gate = self.gate(features)
        return gate[:, 0, None] * model_log_probs.double().exp() + (gate[:, 1:, None] * chain).sum(1)

    def fitted(self, target_probs: torch.Tensor, features: torch.Tensor, iterations: int = 100) -> "CacheMixer":
        """A mixer fitted (L-BFGS from these weights) to maximise sum log sum_s g_s p_s(x_t), given each
        position's sources' probabilities of its target (P, S) and its features (P, F)."""
        weights = self.weights.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([weights], max_iter=iterations, line_search_fn="strong_wolfe")

        def loss_and_grad():
            optimizer.zero_grad()
            gate = torch.softmax(features @ weights.T, -1)
            loss = -torch.log((gate * target_probs).sum(-1)).mean()
            loss.backward()
            return loss

        optimizer.step(loss_and_grad)
        return CacheMixer(weights.detach())


@dataclass
class TextCache:
    """An n-gram cache and the gate that mixes it with the model: what an artifact or run stores."""

    ngram: NgramCache
    mixer: CacheMixer

    def log_probs(self, tokens: np.ndarray, positions: np.ndarray, model_log_probs: torch.Tensor,
                  online: NgramCache | None = None, available: np.ndarray | None = None) -> torch.Tensor:
        """log p(. | x_<t) (float64, (P, V)) at ``positions`` of ``tokens``, the model's log-probabilities there given."""
        chain, confidence = self.ngram.chain(tokens, positions, online=online, available=available)
        return self.mixer.mix(model_log_probs, chain, confidence).log()

    def mix_next(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        """log p(next | ``history``) (float32, (V,)) from the model's logits for it (generation)."""
        context = list(history[-self.ngram.max_order:])
        tokens = np.array(context + [0], np.int64)
        model_log_probs = torch.log_softmax(logits.detach().double().cpu()[None], -1)
        return self.log_probs(tokens, np.array([len(context)]), model_log_probs)[0].float().to(logits.device)

    def sources_and_features(self, tokens: np.ndarray, positions: np.ndarray, model_log_probs: torch.Tensor,
                             leave_one_out: bool = False, online: NgramCache | None = None,
                             available: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What fitting needs per position: each source's probability of the target (P, S) and f(t) (P, F)."""
        chain, confidence = self.ngram.chain(tokens, positions, leave_one_out, online, available)
        targets = torch.from_numpy(np.asarray(tokens, np.int64)[positions])
        model_probs = model_log_probs.double().exp().gather(-1, targets[:, None])
        cache_probs = chain.gather(-1, targets[:, None, None].expand(-1, chain.shape[1], 1))[..., 0]
        return torch.cat([model_probs, cache_probs], 1), gate_features(model_log_probs, chain, confidence)

    def to_bytes(self) -> bytes:
        sources, features = self.mixer.weights.shape
        body = (HEADER.pack(MAGIC, VERSION, sources, features)
                + self.mixer.weights.numpy().astype("<f8").tobytes() + self.ngram.to_bytes())
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "the n-gram cache") -> "TextCache":
        if len(blob) < HEADER.size + 4 or blob[:4] != MAGIC:
            raise UserError(f"{where} is corrupted (bad magic or too short)")
        _, version, sources, features = HEADER.unpack_from(blob)
        if version != VERSION:
            raise UserError(f"{where} has format version {version}; this seedbed reads version {VERSION}")
        if zlib.crc32(blob[:-4]) != struct.unpack("<I", blob[-4:])[0]:
            raise UserError(f"{where} is corrupted (checksum mismatch)")
        weights_end = HEADER.size + 8 * sources * features
        if weights_end > len(blob) - 4:
            raise UserError(f"{where} is corrupted (mixer larger than the file)")
        ngram = NgramCache.from_bytes(blob[weights_end:-4], where)
        if (sources, features) != (ngram.max_order + 2, n_features(ngram.max_order)):
            raise UserError(f"{where} is corrupted (a {sources} x {features} mixer for {ngram.max_order} orders)")
        weights = torch.from_numpy(np.frombuffer(blob[HEADER.size:weights_end], "<f8").astype(np.float64).copy())
        if not torch.isfinite(weights).all():
            raise UserError(f"{where} is corrupted (mixer weights not finite)")
        return cls(ngram, CacheMixer(weights.reshape(sources, features)))


def build_text_cache(model, tokens: np.ndarray, vocab: int, orders: int, smoothing: str = "witten-bell",
                     discount: float = 0.75, fit_tokens: int = 65536, stride: int = 0, batch_size: int = 16,
                     ngram: NgramCache | None = None, device: str | torch.device = "cpu") -> TextCache:
    """Count the training stream ``tokens`` (unless its counts ``ngram`` are given) and fit the gate on
    its last ``fit_tokens`` positions, the cache left-one-out there (see the module docstring)."""
    from seedbed.eval import window_log_probs

    tokens = np.asarray(tokens, np.int64)
    ngram = ngram if ngram is not None else NgramCache.count(tokens, vocab, orders, smoothing, discount)
    cache = TextCache(ngram, CacheMixer.uniform(ngram.max_order))
    start = max(0, len(tokens) - 1 - fit_tokens)
    context = model.cfg.max_seq_len
    sources, features = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for positions, scored in window_log_probs(model, torch.from_numpy(tokens[start:]), context,
                                                  stride or max(1, context // 2), batch_size, device):
            s, f = cache.sources_and_features(tokens, positions + start, scored.cpu(), leave_one_out=True)
            sources.append(s)
            features.append(f)
    model.train(was_training)
    if not sources:  # a stream of one token: nothing to fit on
        return cache
    return TextCache(ngram, cache.mixer.fitted(torch.cat(sources), torch.cat(features), iterations=200))
