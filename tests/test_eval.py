import math

import numpy as np
import pytest
import torch

from seedbed.errors import UserError
from seedbed.eval import evaluate_bpb, scoring_windows


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
