"""Sampling a next token from float logits: temperature, top-k and nucleus (top-p) filtering.

Plain decoding (``LM.generate``) and self-speculative decoding (``layerskip.py``) draw from the
same filtered distribution; speculative sampling also needs that distribution itself.
"""

from __future__ import annotations

import torch


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution sampling draws from: logits / temperature, then top-k, then the nucleus
    (the smallest prefix of the sorted probabilities whose mass reaches top_p, at least one token)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> int:
    """Draw one token from float logits (V,) with temperature, top-k and nucleus filtering;
    temperature 0 is greedy (the argmax)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
