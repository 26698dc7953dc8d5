"""Honest bits per byte: causal, normalised, scored once, left to right.

The token stream is cut into windows of at most ``context`` tokens. The first window
scores all of its targets; each later window advances by ``stride`` and scores only
its last ``stride`` targets, so every token is scored exactly once with at least
``context - stride`` tokens of context. Token 0 has no context and is scored with the
uniform distribution (log2 V bits), so every byte of the text is paid for.

Answer accuracy (``modular:P`` data, see ``data/modular.py``) rides on the same pass: given
which tokens spell which equation's answer, an equation counts as right when the argmax of
the model's prediction is the true token at every one of its answer tokens, each predicted
from the text before it (teacher-forced, with the windows' context).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from seedbed.errors import UserError

NORMALISATION_TOLERANCE = 1e-4


@dataclass
class EvalResult:
    bits: float
    tokens: int
    n_bytes: int
    seconds: float
    answers_right: int = 0  # equations whose every answer token was the argmax (when answers were given)
    answers_total: int = 0

    @property
    def answer_accuracy(self) -> float:
        return self.answers_right / self.answers_total if self.answers_total else float("nan")

    @property
    def bpb(self) -> float:
        return self.bits / self.n_bytes

    @property
    def bits_per_token(self) -> float:
        return self.bits / self.tokens


def scoring_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(input_start, input_end, n_scored): inputs x[a:b] predict x[a+1:b+1]; score the last n."""
    windows = []
    lo = 1
    while lo < n_tokens:
        hi = min(n_tokens, lo + (context if lo == 1 else stride))
        length = min(context, hi - 1)
        windows.append((hi - 1 - length, hi - 1, hi - lo))
        lo = hi
    return windows


def check_normalised(log_probs: torch.Tensor, chunk_elements: int = 1 << 22) -> None:
    """Sum of probabilities over the whole vocabulary must be 1 at every position.

    Every row is checked, not a sample: a model unnormalised at a few positions (one
    input token, the last position of a window) would otherwise slip through and be
    paid for only where it helps. Rows are summed in float64, a chunk at a time, so
    the check needs little memory beyond the log-probabilities themselves.
    """
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    rows = max(1, chunk_elements // flat.shape[-1])
    worst = torch.stack([(chunk.double().exp().sum(-1) - 1).abs().max() for chunk in flat.split(rows)])
    worst = worst.max().item()  # NaN propagates through max, and fails the test below
    if not math.isfinite(worst) or worst > NORMALISATION_TOLERANCE:
        raise UserError(f"the model's distribution is not normalised (|sum p - 1| = {worst:.3g}); "
                        "its bpb would not be honest")


@torch.no_grad()
def evaluate_bpb(model, tokens: np.ndarray, n_bytes: int, context: int, stride: int = 0,
                 batch_size: int = 16, device: str | torch.device = "cpu", autocast_dtype=None,
                 answers: np.ndarray | None = None, cache=None) -> EvalResult:
    """Bits per byte of ``tokens`` (which encode ``n_bytes`` bytes of text) under ``model`` (mixed with
    ``cache``, a ``cachemix.TextCache``, when given: its counts are the training text's only); with
    ``answers`` (per token: the equation whose answer it spells, -1 elsewhere), also how many
    equations have every answer token predicted right (argmax)."""
    if len(tokens) == 0 or n_bytes <= 0:
        raise UserError("nothing to evaluate: the text is empty")
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise UserError(f"eval stride must be in 1..{context}, got {stride}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    vocab = model.cfg.vocab_size
    tokens = np.asarray(tokens, dtype=np.int64)
    data = torch.as_tensor(tokens)
    bits = math.log2(vocab)  # token 0, scored with no context
    nats = 0.0
    if answers is not None and len(answers) != len(data):
        raise ValueError(f"answers mark {len(answers)} tokens, the text has {len(data)}")
    right = np.zeros(len(data), dtype=bool)  # position t: the argmax predicted token t
    for positions, scored in window_log_probs(model, data, context, stride, batch_size, device, autocast_dtype):
        if cache is not None:
            scored = cache.log_probs(tokens, positions, scored.cpu())
        check_normalised(scored)
        targets = data[positions].to(scored.device)
        nats -= scored.gather(-1, targets[:, None]).double().sum().item()
        if answers is not None:
            right[positions] = (scored.argmax(-1) == targets).cpu().numpy()
    model.train(was_training)
    result = EvalResult(bits=bits + nats / math.log(2), tokens=len(data), n_bytes=n_bytes,
                        seconds=time.perf_counter() - start)
    if answers is not None:
        result.answers_right, result.answers_total = count_right_answers(right, np.asarray(answers))
    return result


def window_log_probs(model, data: torch.Tensor, context: int, stride: int, batch_size: int = 16,
                     device: str | torch.device = "cpu", autocast_dtype=None):
    """Yield (positions, log-probabilities (n, V), float32) batch by batch: every position 1..N-1 of
    ``data`` once, each predicted from the windows of ``scoring_windows``."""
    windows = scoring_windows(len(data), context, stride)
    # Windows of equal length batch together; only the first and last can be shorter.
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for window in windows:
        by_length.setdefault(window[1] - window[0], []).append(window)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                if autocast_dtype is not None else nullcontext())
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            inputs = torch.stack([data[a:b] for a, b, _ in batch]).to(device)
            with autocast:
                log_probs = model.log_probs(inputs).float()
            # The scored rows of every window, and the text positions they predict.
            scored = torch.cat([log_probs[row, length - n:] for row, (_, _, n) in enumerate(batch)])
            yield np.concatenate([np.arange(b + 1 - n, b + 1) for _, b, n in batch]), scored


def count_right_answers(right: np.ndarray, answers: np.ndarray) -> tuple[int, int]:
    """(equations with every answer token right, equations): ``right`` per position, ``answers``
    per position the equation its token answers (-1: none)."""
    marked = answers >= 0
    equations = np.unique(answers[marked])
    wrong = np.unique(answers[marked & ~right])
    return len(equations) - len(wrong), len(equations)


def answer_accuracy(model, split, context: int, stride: int = 0, batch_size: int = 16,
                    device: str | torch.device = "cpu") -> EvalResult:
    """Answer accuracy (and bpb) of a ``modular:P`` split (``data.Split`` with ``answers``): the
    model runs over the split's token stream in windows of ``context`` tokens, teacher-forced."""
    if split.answers is None:
        raise UserError("answer accuracy needs modular:P data (its splits mark the answers)")
    return evaluate_bpb(model, split.tokens, split.n_bytes, context, stride, batch_size, device, answers=split.answers)
