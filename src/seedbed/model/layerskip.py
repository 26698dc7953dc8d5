"""LayerSkip (Elhoushi et al. 2024): train a model to exit early, then decode with its own first layers as the draft.

Training (``model.layer_dropout`` p, ``model.early_exit_loss`` e; both 0 by default):

    layer dropout     depth l of L is skipped for a whole sequence with probability
                      p_l = p * (2^(l / (L - 1)) - 1): never at the first depth, p at the last
    early-exit loss   every depth's hidden state h_l goes through the model's own final norm and head:
                      objective = sum_l w_l CE(head(norm(h_l)), y), with
                      e_l = e * l (l + 1) / 2 for l < L - 1,  e_(L-1) = (L - 1) + e * (L - 2)(L - 1) / 2,
                      w = e / sum(e)

(the paper's scales, without its curriculum: every exit trains at every step; e = 0 leaves the
plain loss, w_(L-1) = 1). The logged training loss stays the last layer's cross-entropy.

Inference. ``LM.forward(tokens, exit_layer=E)`` scores with the first E layers and the shared head.

Self-speculative decoding with E draft layers and D draft tokens per round. The state always holds
every token but the last chosen one, y_1 (chosen by the full model, or accepted):

    draft     feed y_1, ..., y_D through layers 1..E one at a time (their caches grow as the full
              model's would), proposing y_(i+1) from q_i = head(norm(h_E)) after y_i
    verify    layers E+1..L on the D drafted hidden states in one pass: the full model's p_1..p_D
    accept    greedy: y_(i+1) while it is argmax p_i; the first mismatch is replaced by argmax p_i.
              sampling: y_(i+1) with probability min(1, p_i(y) / q_i(y)); the first rejection is
              replaced by a draw from max(0, p_i - q_i) normalised (Leviathan et al. 2023), so every
              emitted token has exactly the full model's (filtered) distribution p
    rewind    the state keeps the tokens up to the last accepted one; a layer whose state cannot just
              forget positions (an attention cache can) is restored from before the round and re-run
              on its recorded inputs of the kept positions

Greedy drafting emits exactly the tokens plain greedy decoding emits, up to float rounding: the
verifying pass computes the same logits in one chunk instead of D steps, equal to ~1e-6, which
can only flip an argmax between two logits that close. When the context fills, both rebuild the
state from the last half-context at the same token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seedbed.model.sampling import filtered_probs, sample
from seedbed.registry import require


def layer_dropout_rates(p: float, n_layers: int) -> list[float]:
    """p_l = p (2^(l / (L - 1)) - 1) for l = 0..L-1."""
    if n_layers == 1:
        return [0.0]
    return [p * (2 ** (l / (n_layers - 1)) - 1) for l in range(n_layers)]


def early_exit_weights(e: float, n_layers: int) -> list[float]:
    """The normalised weights w_0..w_(L-1) of every depth's exit in the training objective."""
    scales = [e * l * (l + 1) / 2 for l in range(n_layers - 1)]
    scales.append((n_layers - 1) + e * (n_layers - 2) * (n_layers - 1) / 2 if n_layers > 1 else 1.0)
    total = sum(scales)
    return [s / total for s in scales]


def early_exit_objective(model, loss: torch.Tensor, exits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """sum_l w_l CE_l from the final cross-entropy ``loss`` and the hidden states after depths 0..L-2."""
    weights = early_exit_weights(model.cfg.early_exit_loss, model.cfg.n_layers)
    total = weights[-1] * loss
    for weight, hidden in zip(weights, exits):
        logits = model.logits(hidden)
        total = total + weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return total


def skip_rows(layer, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor | None, rate: float) -> torch.Tensor:
    """Layer dropout: each sequence of the batch skips ``layer`` with probability ``rate``; the layer
    runs only on the sequences that keep it."""
    keep = torch.rand(h.shape[0], device=h.device) >= rate
    if bool(keep.all()):
        return layer(h, embedded, tokens)
    if not bool(keep.any()):
        return h
    rows = keep.nonzero().squeeze(1)
    out = layer(h[rows], embedded[rows], None if tokens is None else tokens[rows])
    return h.index_copy(0, rows, out)


def accept_or_replace(p: torch.Tensor, q: torch.Tensor, draft: int,
                      generator: torch.Generator | None) -> tuple[bool, int]:
    """Speculative sampling of one drafted token ``draft`` ~ q against the target distribution p:
    keep it with probability min(1, p/q), else draw from max(0, p - q) normalised. The result
    is distributed as p whatever q is."""
    if float(torch.rand((), generator=generator)) * float(q[draft]) < float(p[draft]):
        return True, draft
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p will do
        residual = p
    return False, int(torch.multinomial((residual / residual.sum()).cpu(), 1, generator=generator))


@dataclass
class DraftStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan


def copy_state(state):
    """A decode state's containers copied, its tensors shared: mixers extend a state by writing
    positions past the ones it holds or by replacing tensors, never by changing what it holds."""
    if isinstance(state, dict):
        return {key: copy_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [copy_state(value) for value in state]
    return state


class SelfSpeculative:
    """Decoding with the first ``draft_layers`` layers as the draft model; see the module docstring."""

    def __init__(self, model, draft_layers: int, draft_tokens: int, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None, stats: DraftStats | None = None):
        n_layers = len(model.blocks)
        require(0 < draft_layers < n_layers,
                f"--draft-layers must be between 1 and {n_layers - 1} (the model has {n_layers} layers), "
                f"got {draft_layers}")
        require(draft_tokens > 0, f"--draft-tokens must be positive, got {draft_tokens}")
        require(model.denseformer is None,
                "--draft-layers: this model averages over depths (Denseformer), so its later layers need "
                "every earlier layer's output; self-speculative decoding does not support it")
        self.model, self.draft_layers, self.draft_tokens = model, draft_layers, draft_tokens
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.stats = stats if stats is not None else DraftStats()

    def choose(self, logits: torch.Tensor) -> int:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def prefill(self, tokens: list[int]) -> tuple[torch.Tensor, list]:
        model, window = self.model, self.model.cfg.max_seq_len
        state = model.init_state(1, window)
        logits, state = model.step(torch.tensor([tokens], device=model.embed.weight.device), state)
        return logits[0, -1], state

    def generate(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        window = self.model.cfg.max_seq_len
        history = list(prompt)[-window:]
        logits, state = self.prefill(history)
        pending = self.choose(logits)
        emitted = 0
        while True:
            yield pending
            emitted += 1
            history.append(pending)
            if emitted >= max_new_tokens:
                return
            if len(history) >= window:  # where plain decoding rebuilds too
                history = history[-(window // 2):]
                logits, state = self.prefill(history)
                pending = self.choose(logits)
                continue
            chosen, state = self.round(state, pending, min(self.draft_tokens, window - len(history)))
            for token in chosen[:-1]:
                yield token
                emitted += 1
                history.append(token)
                if emitted >= max_new_tokens:
                    return
            pending = chosen[-1]

    def round(self, state: list, first: int, drafts: int) -> tuple[list[int], list]:
        """Draft ``drafts`` tokens after ``first``, verify them; the emitted tokens (the last one not yet
        in the state) and the state holding ``first`` and the accepted tokens before the last."""
        model, blocks, split = self.model, self.model.blocks, self.draft_layers
        device = model.embed.weight.device
        before = [copy_state(s) for s in state]
        inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
        hidden, embeds, fed, draft_logits, proposed = [], [], [], [], []
        token = first
        for _ in range(drafts):
            ids = torch.tensor([[token]], device=device)
            h = embedded = model.embed(ids)
            for depth in range(split):
                inputs[depth].append(h)
                h, state[depth] = blocks[depth].step(h, embedded, ids, state[depth])
            hidden.append(h)
            embeds.append(embedded)
            fed.append(ids)
            logits = model.logits(h)[0, -1]
            draft_logits.append(logits)
            token = self.choose(logits)
            proposed.append(token)
        h, embedded, ids = torch.cat(hidden, 1), torch.cat(embeds, 1), torch.cat(fed, 1)
        for depth in range(split, len(blocks)):
            inputs[depth].append(h)
            h, state[depth] = blocks[depth].step(h, embedded, ids, state[depth])
        full_logits = model.logits(h)[0]

        chosen = []
        for i, token in enumerate(proposed):
            if self.temperature == 0:
                best = int(full_logits[i].argmax())
                kept, token = best == token, best
            else:
                p = filtered_probs(full_logits[i], self.temperature, self.top_k, self.top_p)
                q = filtered_probs(draft_logits[i], self.temperature, self.top_k, self.top_p)
                kept, token = accept_or_replace(p, q, token, self.generator)
            chosen.append(token)
            if not kept:
                break
        accepted = len(chosen) - (0 if len(chosen) == drafts and kept else 1)
        self.stats.rounds += 1
        self.stats.drafted += drafts
        self.stats.accepted += accepted
        keep = len(chosen) if accepted < drafts else drafts  # fed tokens the state keeps
        if keep < drafts:
            for depth, layer in enumerate(blocks):
                state[depth] = self.rewind(layer, before[depth], inputs[depth], embedded, ids, keep)
        return chosen, state

    @staticmethod
    def rewind(layer, before, inputs: list[torch.Tensor], embedded: torch.Tensor, ids: torch.Tensor, keep: int):
        """The layer's state after the first ``keep`` positions the round fed it, from its state before."""
        known, state = layer.rewind(before, keep)
        if known:
            return state
        h = torch.cat(inputs, 1)[:, :keep]
        return layer.step(h, embedded[:, :keep], ids[:, :keep], before)[1]
