"""Gradient-free seed search: never accepts a worse seed, and it can find better ones."""

import json

import torch

from seedbed.config import ModelConfig, resolve_config
from seedbed.model import LM
from seedbed.train.checkpoint import load_checkpoint
from seedbed.train.seed_search import SeedSearch
from seedbed.train.trainer import Trainer


def test_search_never_accepts_a_worse_seed_on_its_batch():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, max_seq_len=16,
                           mixer={"kind": "attention", "n_heads": 2}, linear={"kind": "seeded", "rank": 4})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    score = lambda: model.loss(tokens[:, :-1], tokens[:, 1:])
    search = SeedSearch(model, candidates=3, seed=0)
    assert len(search.targets) == 6  # q, k, v, out, up, down
    accepted = 0
    for _ in range(24):
        before = score().item()
        seeds_before = {name: m.seeds.clone() for name, m in search.targets}
        outcome = search.step(score)
        after = score().item()
        assert outcome.baseline == before
        assert after <= before  # never worse on the scoring batch
        if outcome.accepted:
            accepted += 1
            assert after == outcome.best < before
        else:
            assert all(torch.equal(m.seeds, seeds_before[name]) for name, m in search.targets)
    assert accepted > 0, "24 rounds of 3 candidates found no improvement at all"


def test_trainer_runs_the_search_and_resumes_its_state(small_corpus, tmp_path):
    cfg = resolve_config("germinator", overrides=[
        "model.d_model=32", "model.n_layers=1", "model.max_seq_len=32", "train.batch_size=4", "train.steps=6",
        "train.dtype=fp32", "train.seed_search_every=2", "train.seed_search_candidates=2",
        f'data.spec="{small_corpus}"'])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "seed_search" in r]
    assert [r["step"] for r in rounds] == [2, 4, 6]
    assert all(r["loss_best"] < r["loss_before"] or not r["accepted"] for r in rounds)
    tensors, _ = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert int(tensors["seed_search.next_target"]) == 3
