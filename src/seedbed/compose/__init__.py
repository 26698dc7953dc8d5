"""Composition of experts (efficient_transformer_v1, part two): one model made of trained models.

A composed model answers like an ``LM`` (``cfg``, ``log_probs``, ``init_state`` / ``step``,
``generate``), so ``eval``, ``generate`` and ``compress`` take its artifact like any other. Its
``composition()`` is what the artifact's manifest records beside the tensors; ``build_composed``
rebuilds the (untrained) module from it, to be filled by ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from seedbed.compose.cbtm import CBTM, Router, check_composition
from seedbed.compose.cluster import feature_count
from seedbed.config import config_from_dict
from seedbed.errors import UserError
from seedbed.model import LM, effective_parameters


def build_composed(composition: dict, where: str) -> nn.Module:
    """The module a manifest's ``composition`` entry describes, every field checked first."""
    if not isinstance(composition, dict) or composition.get("kind") != "cbtm":
        raise UserError(f"{where} is corrupted or newer than this seedbed (unknown composition)")
    members, top_k, temperature = check_composition(composition, where)
    models = composition.get("models")
    if not (isinstance(models, list) and len(models) == members and all(isinstance(m, dict) for m in models)):
        raise UserError(f"{where} is corrupted (c-BTM expert configs missing)")
    experts = [LM(config_from_dict({"model": model}).model) for model in models]
    vocab = experts[0].cfg.vocab_size
    router = Router(torch.zeros(feature_count(vocab)), torch.zeros(members, feature_count(vocab)), vocab,
                    top_k, temperature)
    return CBTM(experts, router)


def composition_entry(model: nn.Module) -> dict | None:
    """The manifest entry of a composed model (with its experts' configs); None for an LM."""
    return model.composition() if isinstance(model, CBTM) else None


def effective_parameters_of(model: nn.Module) -> int:
    """Parameters run per token: every expert's (c-BTM runs all of them at every position)."""
    if isinstance(model, CBTM):
        return sum(effective_parameters(member) for member in model.members)
    return effective_parameters(model)
