"""Gradient-free seed search: proposals are picked on one batch and judged on another."""

import json

import pytest
import torch
from torch import nn

from seedbed.config import ModelConfig, resolve_config
from seedbed.model import LM
from seedbed.train.checkpoint import load_checkpoint
from seedbed.train.seed_search import SeedSearch
from seedbed.train.trainer import Trainer

from test_train import interrupt_at_step


class Seeded(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seeds", torch.tensor([1, 2, 3]))


class Scorer:
    """Per-sequence losses set by hand: ``current`` for the starting seeds, ``proposal(rank)`` for
    the proposal with that rank on the selection batch (0 = the one the selection picks)."""

    def __init__(self, module: Seeded, selection: dict, acceptance: dict, sequences: int = 8):
        self.module, self.start = module, module.seeds.clone()
        self.selection, self.acceptance = selection, acceptance
        self.ranks: dict[tuple[int, ...], int] = {}  # proposal -> its rank, from the order it is scored in
        self.wobble = torch.linspace(-0.01, 0.01, sequences)  # some spread between sequences

    def value(self, table: dict) -> torch.Tensor:
        seeds = tuple(self.module.seeds.tolist())
        if torch.equal(self.module.seeds, self.start):
            return table["current"] + self.wobble
        return table["proposal"](self.ranks[seeds]) + self.wobble

    def select(self) -> torch.Tensor:
        seeds = tuple(self.module.seeds.tolist())
        if not torch.equal(self.module.seeds, self.start):
            # Proposals arrive in an arbitrary order; give them ranks in a scrambled order.
            self.ranks.setdefault(seeds, [2, 0, 3, 1][len(self.ranks)])
        return self.value(self.selection)

    def accept(self) -> torch.Tensor:
        return self.value(self.acceptance)


def run_round(selection: dict, acceptance: dict, margin: float = 2.0):
    module = Seeded()
    scorer = Scorer(module, selection, acceptance)
    search = SeedSearch(module, candidates=4, seed=0, margin=margin)
    outcome = search.step(scorer.select, scorer.accept)
    picked = next(s for s, rank in scorer.ranks.items() if rank == 0)
    return outcome, module, scorer.start, torch.tensor(picked)


SELECTION_FAVOURS = {"current": 3.0, "proposal": lambda rank: 2.0 + 0.1 * rank}


def test_a_proposal_that_wins_selection_but_loses_acceptance_is_rejected():
    outcome, module, start, _ = run_round(SELECTION_FAVOURS, {"current": 3.0, "proposal": lambda rank: 3.1})
    assert not outcome.accepted
    assert torch.equal(module.seeds, start)
    assert outcome.select_before == pytest.approx(3.0) and outcome.select_best == pytest.approx(2.0)
    assert outcome.accept_before == pytest.approx(3.0) and outcome.accept_best == pytest.approx(3.1)


def test_a_proposal_better_on_both_batches_is_accepted():
    outcome, module, start, picked = run_round(SELECTION_FAVOURS, {"current": 3.0, "proposal": lambda rank: 2.9})
    assert outcome.accepted
    assert torch.equal(module.seeds, picked) and not torch.equal(picked, start)
    assert outcome.accept_best == pytest.approx(2.9)


def test_acceptance_is_decided_by_the_acceptance_batch_alone():
    # Every proposal is far worse on the selection batch; the one picked there wins acceptance.
    worse = {"current": 1.0, "proposal": lambda rank: 5.0 + rank}
    outcome, module, _, picked = run_round(worse, {"current": 3.0, "proposal": lambda rank: 2.9})
    assert outcome.accepted and torch.equal(module.seeds, picked)
    # The same acceptance batch with a different selection batch: the same decision.
    rejected, _, _, _ = run_round(worse, {"current": 3.0, "proposal": lambda rank: 3.1})
    assert not rejected.accepted


def test_a_gain_within_the_noise_needs_the_margin_waived():
    # Per-sequence gains of 0.01 +- 0.1: a mean gain, but under two standard errors.
    noisy = {"current": 3.0, "proposal": lambda rank: 2.99 + 0.1 * torch.tensor([1.0, -1] * 4)}
    outcome, _, _, _ = run_round(SELECTION_FAVOURS, noisy)
    assert outcome.accept_best < outcome.accept_before and not outcome.accepted
    assert outcome.accept_stderr == pytest.approx(0.1 / 8**0.5, rel=0.1)
    assert run_round(SELECTION_FAVOURS, noisy, margin=0.0)[0].accepted


def test_on_a_model_the_outcome_reports_its_losses_and_only_an_accepted_proposal_stays():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, max_seq_len=16,
                           mixer={"kind": "attention", "n_heads": 2}, linear={"kind": "seeded", "rank": 4})).eval()
    with torch.no_grad():  # away from the zero-initialised projections, so every seed matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    batches = [torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(i)) for i in (1, 2)]

    def per_sequence(tokens):
        @torch.no_grad()
        def score():
            return nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:],
                                               reduction="none").mean(1)
        return score

    select, accept = map(per_sequence, batches)
    search = SeedSearch(model, candidates=3, seed=0, margin=0.0)
    assert len(search.targets) == 6  # q, k, v, out, up, down
    decisions = []
    for _ in range(6):  # one round per module
        seeds_before = {name: m.seeds.clone() for name, m in search.targets}
        select_before, accept_before = float(select().mean()), float(accept().mean())
        outcome = search.step(select, accept)
        assert outcome.select_before == pytest.approx(select_before, abs=1e-6)
        assert outcome.accept_before == pytest.approx(accept_before, abs=1e-6)
        assert float(accept().mean()) == pytest.approx(outcome.accept_best if outcome.accepted
                                                       else accept_before, abs=1e-6)
        changed = [name for name, m in search.targets if not torch.equal(m.seeds, seeds_before[name])]
        assert changed == ([outcome.module] if outcome.accepted else [])
        decisions.append(outcome.accepted)
    assert any(decisions) and not all(decisions), decisions  # both branches ran


SEARCH_RUN = ["model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "train.batch_size=4",
              "train.steps=8", "train.dtype=fp32", "train.threads=1", "train.checkpoint_every_steps=4",
              "train.seed_search_every=2", "train.seed_search_candidates=2", "train.device=cpu"]


def search_state(run) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.endswith(".seeds") or "seed_search" in k}


def search_rounds(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "seed_search" in r]


def test_trainer_search_resumes_exactly(small_corpus, tmp_path):
    cfg = lambda: resolve_config("germinator", overrides=[*SEARCH_RUN, f'data.spec="{small_corpus}"'])
    Trainer(cfg(), tmp_path / "straight", progress=False).run()

    interrupt_at_step(Trainer(cfg(), tmp_path / "split", progress=False), 7)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.safetensors")[1]["step"] == 4
    Trainer(cfg(), tmp_path / "split", resume=True, progress=False).run()

    straight, resumed = search_state(tmp_path / "straight"), search_state(tmp_path / "split")
    assert straight.keys() == resumed.keys() and any(k.endswith(".seeds") for k in straight)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name  # seeds bit-exact, search RNG too
    assert int(straight["seed_search.next_target"]) == 4
    rounds = search_rounds(tmp_path / "straight")
    assert [r["step"] for r in rounds] == [2, 4, 6, 8]
    assert rounds == search_rounds(tmp_path / "split")  # the same proposals, losses and decisions
    for r in rounds:  # acceptance follows the acceptance batch, not the selection one
        assert r["accepted"] == (r["accept_best"] - r["accept_before"] + 2 * r["accept_stderr"] < 0)
