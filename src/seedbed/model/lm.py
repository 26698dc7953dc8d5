"""The decoder language model: embedding, the layer stack (``stack.py``), head.

``forward`` scores a whole sequence in parallel; ``init_state`` + ``step`` extend it
incrementally with each mixer's cache or recurrent state, and ``generate`` samples.
Logits are always returned in float32, so every consumer normalises the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Importing the component modules registers them.
from seedbed.model import (attention, bitlinear, hourglass, kan, mamba2, mlp, modulo_experts, moe,  # noqa: F401
                           multichannel, peer, retention, seeded)
from seedbed.config import ModelConfig
from seedbed.errors import UserError
from seedbed.hardware import return_large_frees_to_the_system
from seedbed.model.layers import BuildContext
from seedbed.model.layerskip import DraftStats, SelfSpeculative, early_exit_objective, layer_dropout_rates
from seedbed.model.sampling import sample
from seedbed.model.seeded import SeedCache
from seedbed.model.stack import Layer, SharedParts, build_denseformer, build_stack, run_stack
from seedbed.registry import require


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.embed_init_std)
        self.shared, self.blocks = build_stack(cfg)
        self.denseformer = build_denseformer(cfg.n_layers, cfg.denseformer, "model.denseformer")
        self.dropout_rates = layer_dropout_rates(cfg.layer_dropout, cfg.n_layers) if cfg.layer_dropout else None
        self.exits: list[torch.Tensor] | None = None
        # Every SharedParts, also those of an hourglass's inner stack; a plain list, not submodules.
        self.shared_parts = [m for m in self.modules() if isinstance(m, SharedParts)]
        head_ctx = BuildContext(cfg.d_model, cfg.n_layers, cfg.n_layers, cfg.max_seq_len, cfg.linear, cfg.norm)
        self.final_norm = head_ctx.norm(cfg.d_model)
        # The output head stays dense whatever the linear kind: it is small and sensitive.
        self.head = None if cfg.tie_embeddings else head_ctx.linear(cfg.d_model, cfg.vocab_size, spec={"kind": "dense"})
        for module in self.modules():
            if isinstance(module, SeedCache):
                module.streaming = cfg.stream_layers
        if cfg.stream_layers:
            return_large_frees_to_the_system()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        logits = F.linear(h, self.embed.weight.to(h.dtype)) if self.head is None else self.head(h)
        logits = logits.float()
        if self.cfg.logit_softcap > 0:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(self, tokens: torch.Tensor, exit_layer: int = 0) -> torch.Tensor:
        """Float32 logits (B, T, V) for next-token prediction at every position; with ``exit_layer``
        E, from the first E layers through the same final norm and head (LayerSkip's early exit).
        In training with ``early_exit_loss``, ``exits`` keeps the hidden states after each depth."""
        for parts in self.shared_parts:
            parts.begin_forward()
        x = embedded = self.embed(tokens)
        checkpointing = self.cfg.stream_layers and torch.is_grad_enabled()
        blocks = self.blocks if not exit_layer else self.blocks[:exit_layer]
        dropout = self.dropout_rates if self.training else None
        self.exits = [] if self.training and self.cfg.early_exit_loss > 0 else None
        x, _ = run_stack(blocks, self.denseformer, x, embedded, tokens, checkpointing=checkpointing,
                         dropout=dropout, exits=self.exits)
        return self.logits(x)

    def objective(self, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What training minimises, from the last training forward's cross-entropy ``loss``: the
        early-exit mixture when enabled, plus the auxiliary losses (MoE balance, routing) it set."""
        if self.exits:
            loss = early_exit_objective(self, loss, self.exits, targets)
        self.exits = None
        return loss + moe.auxiliary_loss(self)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised log-probabilities (B, T, V) of the next token; what evaluation scores."""
        return self(tokens).log_softmax(dim=-1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; in training ``objective``: plus early exits and auxiliary losses."""
        logits = self(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return self.objective(loss, targets) if self.training else loss

    def init_state(self, batch: int, max_len: int) -> list:
        param = self.embed.weight
        return [block.init_state(batch, max_len, param.device, param.dtype) for block in self.blocks]

    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Extend the sequence by ``tokens`` (B, t); returns their logits (B, t, V)."""
        x = embedded = self.embed(tokens)
        x, new_state = run_stack(self.blocks, self.denseformer, x, embedded, tokens, states=state)
        return self.logits(x), new_state

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, draft_layers: int = 0,
                 draft_tokens: int = 4, stats: DraftStats | None = None,
                 mix: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None) -> Iterator[int]:
        """Yield sampled token ids one at a time, using the incremental state.

        ``mix(tokens so far, logits (V,))``, if given, returns the log-probabilities to sample from
        instead (the model mixed with its n-gram cache, ``cachemix.py``).
        When the context fills up, the state is rebuilt from the last half-context of tokens.
        With ``draft_layers`` E, self-speculative decoding (model/layerskip.py): the same tokens
        greedily, the same distribution when sampling; ``stats`` (if given) counts the drafts.
        """
        check_sampling(prompt, temperature, top_k, top_p)
        if draft_layers:
            require(mix is None, "self-speculative decoding samples from the model alone (add --no-cache)")
            decoder = SelfSpeculative(self, draft_layers, draft_tokens, temperature, top_k, top_p, generator, stats)
            yield from decoder.generate(prompt, max_new_tokens)
            return
        yield from decode(self, prompt, max_new_tokens, temperature, top_k, top_p, generator, mix)


def check_sampling(prompt: list[int], temperature: float, top_k: int, top_p: float) -> None:
    require(len(prompt) > 0, "the prompt must contain at least one token")
    require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    require(top_k >= 0, f"top-k must be >= 0, got {top_k}")
    require(0 < top_p <= 1, f"top-p must be in (0, 1], got {top_p}")


class PlainDecoding:
    """``generate`` for a model made of several (the composed ones): plain sampling through
    ``decode``; self-speculative decoding needs one model's early layers, so it is refused."""

    label = "this"  # the model's name in the refusal

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, draft_layers: int = 0,
                 draft_tokens: int = 4, stats: DraftStats | None = None, mix=None) -> Iterator[int]:
        check_sampling(prompt, temperature, top_k, top_p)
        if draft_layers:
            raise UserError(f"self-speculative decoding is not supported for a {self.label} artifact")
        yield from decode(self, prompt, max_new_tokens, temperature, top_k, top_p, generator, mix)


def decode(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None, mix=None) -> Iterator[int]:
    """Plain sampling with any model that has ``cfg.max_seq_len``, ``init_state`` and ``step`` (an
    ``LM`` or a composed model): the incremental state is rebuilt from the last half-context of
    tokens whenever the context fills up."""
    device = next(model.parameters()).device
    window = model.cfg.max_seq_len
    history = list(prompt)[-window:]
    everything = list(prompt)
    state = model.init_state(1, window)
    logits, state = model.step(torch.tensor([history], device=device), state)
    for _ in range(max_new_tokens):
        scores = logits[0, -1] if mix is None else mix(everything, logits[0, -1])
        token = sample(scores, temperature, top_k, top_p, generator)
        yield token
        history.append(token)
        everything.append(token)
        if len(history) >= window:
            history = history[-(window // 2):]
            state = model.init_state(1, window)
            logits, state = model.step(torch.tensor([history], device=device), state)
        else:
            logits, state = model.step(torch.tensor([[token]], device=device), state)


def count_parameters(model: nn.Module) -> int:
    """Stored (trainable or loaded) parameters."""
    return sum(p.numel() for p in model.parameters())


def virtual_parameters(model: nn.Module) -> int:
    """Parameters that run at inference: generated weights count at their full size."""
    generated = [m for m in model.modules() if hasattr(m, "virtual_numel")]
    covered = {id(p) for m in generated for p in m.parameters()}
    return sum(m.virtual_numel for m in generated) + sum(
        p.numel() for p in model.parameters() if id(p) not in covered)


def effective_parameters(model: LM) -> int:
    """Parameters run per token: the virtual count, plus every shared part's again for each use
    after its first (its per-use adapters are counted once already)."""
    extra = 0
    for parts in model.shared_parts:
        uses = sum(1 for layer in model.modules() if isinstance(layer, Layer) and layer.shared is parts)
        extra += (uses - 1) * (virtual_parameters(parts) - parts.adapter_numel())
    return virtual_parameters(model) + extra
