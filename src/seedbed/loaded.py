"""A model ready to use: its config, its tokenizer and where it came from (a run or an artifact).

``seedbed.runs.load`` and ``seedbed.pack.pack.load_artifact`` both return one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seedbed.cachemix import TextCache
from seedbed.config import RunConfig
from seedbed.data import load_dataset, load_splits
from seedbed.data.modular import answer_tokens, parse_modular
from seedbed.errors import UserError
from seedbed.adapt import AdaptOptions, score_streams
from seedbed.eval import EvalResult, evaluate_bpb
from seedbed.model import LM
from seedbed.model.layerskip import DraftStats


@dataclass
class LoadedModel:
    model: LM
    config: RunConfig
    tokenizer: object
    path: Path
    # The run's own final val bpb of exactly these weights (whole split, fp32, default stride),
    # when its metrics record one; a packed model has none.
    recorded_val_bpb: float | None = None
    cache: TextCache | None = None  # the n-gram cache and its gate, when the run or artifact has one

    def encode(self, data: bytes) -> np.ndarray:
        return self.tokenizer.encode(data)

    def stream(self, prompt: str, tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, draft_layers: int = 0, draft_tokens: int = 4,
               stats: DraftStats | None = None, use_cache: bool = True) -> Iterator[str]:
        """Yield generated text piece by piece, decoding UTF-8 incrementally (self-speculatively
        with ``draft_layers``: see ``LM.generate``), from the model mixed with its n-gram cache
        when it has one and ``use_cache``."""
        prompt_ids = [int(t) for t in self.encode(prompt.encode("utf-8"))]
        if not prompt_ids:
            raise UserError("the prompt is empty; give at least one character")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        mix = self.cache.mix_next if use_cache and self.cache is not None else None
        for token in self.model.generate(prompt_ids, tokens, temperature, top_k, top_p, generator,
                                         draft_layers=draft_layers, draft_tokens=draft_tokens, stats=stats, mix=mix):
            piece = decoder.decode(self.tokenizer.decode([token]))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def generate(self, prompt: str, tokens: int = 200, **kwargs) -> str:
        return "".join(self.stream(prompt, tokens, **kwargs))

    def evaluate(self, data: bytes, stride: int = 0, batch_size: int = 0, use_cache: bool = True,
                 adapt: AdaptOptions | None = None, streams: int = 64) -> EvalResult:
        """Honest bpb of a byte string (a whole text scored left to right), with the n-gram cache
        when there is one and ``use_cache``, adapting score-first as ``adapt`` says (None: not)."""
        return self.score(self.encode(data), len(data), stride, use_cache, adapt, streams, batch_size=batch_size)

    def score(self, tokens: np.ndarray, n_bytes: int, stride: int = 0, use_cache: bool = True,
              adapt: AdaptOptions | None = None, streams: int = 64, context: int = 0, answers=None,
              batch_size: int = 0) -> EvalResult:
        """``batch_size`` 0: the micro-batch the model trained at, which its memory budget was set for."""
        cache = self.cache if use_cache else None
        if adapt is not None:
            if context:
                raise UserError("--adapt scores with the model's own context")
            return score_streams(self.model, tokens, n_bytes, streams, stride or self.config.model.max_seq_len // 2,
                                 cache, adapt, self.tokenizer.surfaces)
        return evaluate_bpb(self.model, tokens, n_bytes, context or self.config.model.max_seq_len, stride,
                            batch_size=batch_size or self.config.train.batch_size, answers=answers, cache=cache)

    def evaluate_split(self, spec: str, split: str, stride: int = 0, max_tokens: int = 0,
                       context: int = 0, use_cache: bool = True, adapt: AdaptOptions | None = None,
                       streams: int = 64) -> EvalResult:
        """bpb on one split of a corpus (its first ``max_tokens`` tokens if given), in this model's tokenizer,
        with windows of ``context`` tokens (0: the context it was trained at); on ``modular:P`` data
        also the answer accuracy (of the whole split only: not with ``max_tokens``, nor ``adapt``)."""
        if spec.startswith("shards:"):  # already tokens: the shards' own tokenizer counts the bytes
            chosen = getattr(load_dataset(spec, self.config.data.tokenizer, self.config.data.vocab_size), split)
            tokens, n_bytes = chosen.tokens, chosen.n_bytes
        else:
            train, val, test = load_splits(spec)
            docs = {"train": train, "val": val, "test": test}[split]
            tokens = np.concatenate([self.encode(doc.data) for doc in docs])
            n_bytes = sum(len(doc.data) for doc in docs)
        modular = parse_modular(spec)
        answers = answer_tokens(self.tokenizer.byte_lengths(tokens), modular) if modular else None
        if 0 < max_tokens < len(tokens):
            tokens, answers = tokens[:max_tokens], None
            n_bytes = self.tokenizer.count_bytes(tokens)
        return self.score(tokens, n_bytes, stride, use_cache, adapt, streams, context, answers)
