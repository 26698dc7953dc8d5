"""Composition of experts (efficient_transformer_v1, part two): one model made of trained models.

A composed model answers like an ``LM`` (``cfg``, ``log_probs``, ``init_state`` / ``step``,
``generate``), so ``eval``, ``generate`` and ``compress`` take its artifact like any other. Its
``composition()`` is what the artifact's manifest records beside the tensors; ``build_composed``
rebuilds the (untrained) module from it, to be filled by ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from seedbed.compose.calm import CALM
from seedbed.compose.cbtm import CBTM, Router, checked_temperature
from seedbed.compose.cluster import feature_count
from seedbed.compose.phatgoose import PhatGoose
from seedbed.config import config_from_dict
from seedbed.errors import UserError
from seedbed.model import LM, effective_parameters


def build_composed(composition: dict, where: str) -> nn.Module:
    """The module a manifest's ``composition`` entry describes, every field checked first."""
    kind = composition.get("kind") if isinstance(composition, dict) else None
    if kind not in ("cbtm", "phatgoose", "calm"):
        raise UserError(f"{where} is corrupted or newer than this seedbed (unknown composition)")
    models = composition.get("models")
    if not (isinstance(models, list) and models and all(isinstance(m, dict) for m in models)):
        raise UserError(f"{where} is corrupted (the composed models' configs are missing)")
    lms = [LM(config_from_dict({"model": model}).model) for model in models]
    if kind == "calm":
        every, heads = composition.get("every"), composition.get("heads")
        if not (len(lms) == 2 and isinstance(every, int) and isinstance(heads, int) and 1 <= heads <= 1024):
            raise UserError(f"{where} is corrupted (CALM fields out of range)")
        return CALM(lms[0], lms[1], every, heads)
    members, top_k = composition.get("members"), composition.get("top_k")
    if not (isinstance(members, int) and 1 <= members <= 256 and isinstance(top_k, int) and 1 <= top_k <= members
            and len(lms) == (members if kind == "cbtm" else 1)):
        raise UserError(f"{where} is corrupted (composition fields out of range)")
    if kind == "phatgoose":
        rank = composition.get("rank")
        if not (isinstance(rank, int) and 1 <= rank <= 4096):
            raise UserError(f"{where} is corrupted (PHATGOOSE rank out of range)")
        return PhatGoose(lms[0], members, rank, top_k)
    temperature = checked_temperature(composition, where)
    vocab = lms[0].cfg.vocab_size
    router = Router(torch.zeros(feature_count(vocab)), torch.zeros(members, feature_count(vocab)), vocab,
                    top_k, temperature)
    return CBTM(lms, router)


def composition_entry(model: nn.Module) -> dict | None:
    """The manifest entry of a composed model (with its experts' configs); None for an LM."""
    return model.composition() if isinstance(model, (CBTM, PhatGoose, CALM)) else None


def effective_parameters_of(model: nn.Module) -> int:
    """Parameters run per token: every expert's (c-BTM runs all of them at every position, PHATGOOSE
    every module at every linear)."""
    if isinstance(model, CBTM):
        return sum(effective_parameters(member) for member in model.members)
    if isinstance(model, PhatGoose):
        return effective_parameters(model.model)
    if isinstance(model, CALM):
        return effective_parameters(model.anchor) + effective_parameters(model.augmenting) + sum(
            p.numel() for p in model.bridges.parameters())
    return effective_parameters(model)
