import math
import re

import numpy as np
import pytest
import torch

from seedbed.config import ModelConfig
from seedbed.data.tokenizer import ByteTokenizer
from seedbed.errors import UserError
from seedbed.eval import evaluate_bpb, scoring_windows
from seedbed.model import LM


class NextTokenModel(torch.nn.Module):
    """Predicts (previous + 1) mod V with probability p, the rest spread evenly."""

    def __init__(self, vocab=4, p=0.7, normalised=True):
        super().__init__()
        self.cfg = type("Cfg", (), {"vocab_size": vocab})()
        self.p, self.normalised = p, normalised

    def log_probs(self, tokens):
        vocab = self.cfg.vocab_size
        probs = torch.full((*tokens.shape, vocab), (1 - self.p) / (vocab - 1))
        probs.scatter_(-1, ((tokens + 1) % vocab)[..., None], self.p)
        if not self.normalised:
            probs = probs * 1.01
        return probs.log()


def test_bpb_matches_hand_computation():
    tokens = np.array([0, 1, 2, 3, 0, 1, 3])
    expected_bits = 2 + 5 * -math.log2(0.7) + -math.log2(0.1)  # token 0 is uniform: log2(4) = 2
    for context, stride in [(8, 0), (3, 1), (3, 2), (2, 2), (4, 3), (1, 1)]:
        result = evaluate_bpb(NextTokenModel(), tokens, n_bytes=10, context=context, stride=stride)
        assert result.tokens == 7
        assert result.bpb == pytest.approx(expected_bits / 10, rel=1e-6)  # float32 log-probabilities


@pytest.mark.parametrize("n,context,stride", [(2, 4, 2), (100, 16, 5), (101, 16, 16), (17, 16, 8), (1000, 64, 7)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride):
    scored = []
    for a, b, k in scoring_windows(n, context, stride):
        assert 0 <= a < b <= n - 1 and b - a <= context and k <= b - a
        first_target = b + 1 - k
        scored.extend(range(first_target, b + 1))
        # Each scored target sees the whole window before it, at least context - stride tokens once warm.
        if first_target > context:
            assert first_target - a >= context - stride
    assert scored == list(range(1, n))


def test_unnormalised_distribution_is_an_error():
    with pytest.raises(UserError, match="not normalised"):
        evaluate_bpb(NextTokenModel(normalised=False), np.arange(20) % 4, n_bytes=20, context=8)


def test_empty_text_is_an_error():
    with pytest.raises(UserError, match="empty"):
        evaluate_bpb(NextTokenModel(), np.array([], dtype=np.int64), n_bytes=0, context=8)


# --- Unnormalised models are refused, wherever the missing or extra mass is -----------------------------------------

class Distorted(NextTokenModel):
    """NextTokenModel's log-probabilities, then ``distort(log_probs, tokens)`` applied on top."""

    def __init__(self, distort, vocab=6):
        super().__init__(vocab=vocab)
        self.distort = distort

    def log_probs(self, tokens):
        return self.distort(super().log_probs(tokens).clone(), tokens)


def _at_last_position(lp, tokens):
    lp[:, -1] += 0.5  # extra mass exactly where every window scores
    return lp


def _at_one_input_token(lp, tokens):
    return lp + (tokens == 5)[..., None] * 1.0  # token 5 occurs once in the text below


def _nan_at_one_input_token(lp, tokens):
    return lp.masked_fill((tokens == 5)[..., None], float("nan"))


def _slightly_everywhere(lp, tokens):
    return lp + 1e-3  # sum p = 1.001: ten times the tolerance


def _deficient_at_one_input_token(lp, tokens):
    return lp - (tokens == 5)[..., None] * 0.01  # missing mass is refused too


@pytest.mark.parametrize("distort", [_at_last_position, _at_one_input_token, _nan_at_one_input_token,
                                     _slightly_everywhere, _deficient_at_one_input_token],
                         ids=lambda f: f.__name__.strip("_"))
def test_locally_unnormalised_model_is_refused(distort):
    """A model unnormalised at a handful of positions among thousands is refused, not scored.

    With context 64 and stride 8 each batch holds ~1000 positions and the bad ones are
    1 in 64 (last position) or ~8 in total (one input token): a check on a sample of
    positions misses them, and the eval would report a bpb below the honest one.
    """
    tokens = np.arange(300) % 4
    tokens[250] = 5
    honest = evaluate_bpb(Distorted(lambda lp, t: lp), tokens, n_bytes=300, context=64, stride=8)
    assert honest.bpb > 0  # the undistorted model is accepted: the refusals below are not spurious
    with pytest.raises(UserError, match="not normalised"):
        evaluate_bpb(Distorted(distort), tokens, n_bytes=300, context=64, stride=8)


class LogitsLM(LM):
    """A real LM that forgets to normalise: its ``log_probs`` returns raw logits (plus ``shift``)."""

    def __init__(self, cfg, shift=None):
        super().__init__(cfg)
        self.shift = shift

    def log_probs(self, tokens):
        if self.shift is None:
            return self(tokens)
        return self(tokens).log_softmax(-1) + self.shift


@pytest.mark.parametrize("shift", [None, 0.01, -0.01], ids=["raw-logits", "plus-0.01", "minus-0.01"])
def test_unnormalised_language_model_is_refused(shift):
    tokens = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 3, dtype=np.uint8)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, max_seq_len=16)
    torch.manual_seed(0)
    good = LM(cfg)
    assert evaluate_bpb(good, tokens, n_bytes=len(tokens), context=16).bpb > 0
    bad = LogitsLM(cfg, shift)
    bad.load_state_dict(good.state_dict())
    with pytest.raises(UserError, match="not normalised"):
        evaluate_bpb(bad, tokens, n_bytes=len(tokens), context=16)


# --- A model with long context, scored by brute force -------------------------------------------------------------

TEXT = "Naïve café owners — 日本語 too — sell crème brûlée; the quick brown fox jumps over the lazy dog!"


def long_context_lm(context=16, seed=0) -> LM:
    """A randomly initialised 3-layer attention LM whose every weight is perturbed, so that
    predictions depend on the whole window (zero-initialised output projections would not)."""
    torch.manual_seed(seed)
    model = LM(ModelConfig(vocab_size=256, d_model=32, n_layers=3, max_seq_len=context,
                           mixer={"kind": "attention", "n_heads": 4}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def documented_context_start(i: int, n: int, context: int, stride: int) -> int:
    """Where the context of target i starts, read off the rule in eval.py's docstring (not its code).

    The first window x[0:context] predicts targets 1..context, each from everything before it.
    Later window k (k = 0, 1, ...) advances by ``stride`` and scores the targets
    context + 1 + k * stride .. context + (k + 1) * stride (cut at the end of the text), all
    from the ``context`` tokens before its last target.
    """
    if i <= context:
        return 0
    k = (i - context - 1) // stride
    last_target = min(n - 1, context + (k + 1) * stride)
    return last_target - context


def target_bits(model, x: torch.Tensor, start: int, i: int, cache: dict) -> float:
    """-log2 p(x_i | x[start:i]) from one forward pass over exactly that context."""
    if (start, i) not in cache:
        with torch.no_grad():
            log_probs = model(x[None, start:i]).double().log_softmax(-1)
        cache[start, i] = -log_probs[0, -1, x[i]].item() / math.log(2)
    return cache[start, i]


def brute_force_bits(model, tokens: np.ndarray, start_of, cache: dict) -> float:
    """log2 V for token 0, then -log2 p(x_i | x[start_of(i):i]) for every i, one forward per target."""
    x = torch.as_tensor(tokens, dtype=torch.int64)
    bits = math.log2(model.cfg.vocab_size)
    for i in range(1, len(x)):
        start = start_of(i)
        assert 0 <= start < i
        bits += target_bits(model, x, start, i, cache)
    return bits


def test_long_context_model_matches_brute_force():
    data = TEXT.encode("utf-8")
    tokens = ByteTokenizer().encode(data)
    n, context = len(tokens), 16
    assert len(data) > len(TEXT) and n == len(data)  # multi-byte characters: bytes, not characters, count
    model = long_context_lm(context)
    cache: dict = {}
    totals = {}
    for stride, batch_size in [(5, 16), (5, 3), (1, 4), (7, 2), (16, 16), (15, 5)]:
        result = evaluate_bpb(model, tokens, n_bytes=len(data), context=context, stride=stride, batch_size=batch_size)
        expected = brute_force_bits(model, tokens, lambda i: documented_context_start(i, n, context, stride), cache)
        assert result.tokens == n and result.n_bytes == len(data)
        # float32 log-probabilities summed in float64: observed agreement ~1e-8
        assert result.bits == pytest.approx(expected, rel=1e-7), (stride, batch_size)
        assert result.bpb == pytest.approx(expected / len(data), rel=1e-7)
        totals[stride] = expected
    assert totals[1] == pytest.approx(brute_force_bits(model, tokens, lambda i: max(0, i - context), cache),
                                      rel=1e-12)  # stride 1: every target past the first window sees 16 tokens
    # The comparison has teeth: every target's cost moves by more than 1e-3 bits (~9x the
    # tolerance on the ~1100-bit total) when its context loses its first token, so an eval
    # that gave even one target a context one token off would fail the checks above.
    x = torch.as_tensor(tokens, dtype=torch.int64)
    for i in range(context + 1, n):
        start = documented_context_start(i, n, context, 5)
        assert abs(target_bits(model, x, start + 1, i, cache) - cache[start, i]) > 1e-3, i


def test_first_token_costs_log2_vocab_bits():
    model = long_context_lm()
    tokens = ByteTokenizer().encode("é".encode("utf-8"))  # one character, two bytes, two tokens
    one = evaluate_bpb(model, tokens[:1], n_bytes=1, context=16)
    assert one.bits == 8.0 and one.bpb == 8.0  # log2(256), with no model call at all
    two = evaluate_bpb(model, tokens, n_bytes=2, context=16)
    with torch.no_grad():
        second = -model(torch.as_tensor(tokens[None, :1], dtype=torch.int64)).log_softmax(-1)[0, 0, tokens[1]].item()
    assert two.bits == pytest.approx(8.0 + second / math.log(2), rel=1e-6)
    assert two.bpb == pytest.approx(two.bits / 2, rel=1e-12)


class Calculator(torch.nn.Module):
    """Reads ``a+b=`` (and the answer digits so far) before each position and predicts the next answer
    digit of a+b mod P; uniform everywhere else. ``wrong_when_a`` makes it miss that a's last digit."""

    def __init__(self, modulus: int, wrong_when_a: int | None = None):
        super().__init__()
        self.cfg = type("Cfg", (), {"vocab_size": 256})()
        self.modulus, self.wrong_when_a = modulus, wrong_when_a
        self.width = len(str(modulus - 1))

    def next_digit(self, line: bytes) -> int | None:
        w = self.width
        match = re.fullmatch(rb"(\d{%d})\+(\d{%d})=(\d{0,%d})" % (w, w, w - 1), line)
        if match is None:
            return None
        a, b, done = int(match[1]), int(match[2]), len(match[3])
        answer = f"{(a + b) % self.modulus:0{w}d}"
        digit = int(answer[done])
        if a == self.wrong_when_a and done == w - 1:
            digit = (digit + 1) % 10
        return ord(str(digit))

    def log_probs(self, tokens):
        logits = torch.zeros(*tokens.shape, 256)
        for row, values in enumerate(tokens.tolist()):
            text = bytes(values)
            for t in range(len(values)):
                digit = self.next_digit(text[text.rfind(b"\n", 0, t + 1) + 1:t + 1])
                if digit is not None:
                    logits[row, t, digit] = 20.0
        return logits.log_softmax(-1)


@pytest.mark.parametrize("spec", ["modular:7", "modular:23"])
def test_answer_accuracy_counts_equations_whose_every_answer_token_is_right(spec):
    from seedbed.data import load_dataset
    from seedbed.eval import answer_accuracy

    val = load_dataset(spec).val
    modulus = int(spec.split(":")[1])
    perfect = answer_accuracy(Calculator(modulus), val, context=24, stride=12)
    lines = val.tokens.astype(np.uint8).tobytes().splitlines()
    assert perfect.answers_right == perfect.answers_total == len(lines)
    # Missing the last digit whenever a is 3: exactly those equations are wrong.
    missed = sum(int(line.split(b"+")[0]) == 3 for line in lines)
    assert missed > 0
    flawed = answer_accuracy(Calculator(modulus, wrong_when_a=3), val, context=24, stride=12)
    assert (flawed.answers_right, flawed.answers_total) == (len(lines) - missed, len(lines))
    assert flawed.answer_accuracy == pytest.approx(1 - missed / len(lines))
    # bpb is unchanged by asking for answers
    plain = evaluate_bpb(Calculator(modulus), val.tokens, val.n_bytes, context=24, stride=12)
    assert plain.bpb == perfect.bpb and plain.answers_total == 0 and math.isnan(plain.answer_accuracy)


def test_an_answer_is_right_only_when_all_its_tokens_are():
    from seedbed.eval import count_right_answers

    answers = np.array([-1, 0, 0, -1, 1, 1, -1, 2, 2])
    right = np.array([False, True, True, False, True, False, True, True, True])
    assert count_right_answers(right, answers) == (2, 3)
    assert count_right_answers(np.zeros(3, dtype=bool), np.full(3, -1)) == (0, 0)


def test_answer_accuracy_needs_modular_data(default_dataset):
    from seedbed.eval import answer_accuracy

    with pytest.raises(UserError, match="answer accuracy needs modular:P data"):
        answer_accuracy(NextTokenModel(), default_dataset.val, context=8)
