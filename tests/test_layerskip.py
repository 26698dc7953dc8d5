"""LayerSkip (model/layerskip.py): layer dropout, early-exit loss, early exit, self-speculative decoding."""

import torch
import torch.nn.functional as F
from test_cli_errors import assert_one_line_error, seedbed
from test_model import STACKS, small_model

from seedbed.model.layerskip import (DraftStats, accept_or_replace, copy_state, early_exit_weights,
                                     layer_dropout_rates, skip_rows)

DRAFT_STACKS = {
    "attention": {"n_layers": 4},
    "zamba-like": STACKS["zamba-like"],  # Mamba-2 states and a shared attention block: rewound by re-running
    "mixture-of-depths": STACKS["mixture-of-depths-and-staged-mode"],  # one state per row
    "hourglass": {"n_layers": 3, "pattern": ["default", "valley", "default"],
                  "blocks": {"valley": {"mixer": {"kind": "hourglass", "group": 3}, "ffn": {"kind": "none"}}}},
}


def test_self_speculative_greedy_decoding_equals_plain_greedy_token_for_token():
    """The shallowest and deepest drafts, short and long, across the context rebuild (48 positions, 70 tokens)."""
    for name, spec in DRAFT_STACKS.items():
        model = small_model(**spec)
        plain = list(model.generate([5, 2, 9], 70, temperature=0))
        for draft_layers in sorted({1, model.cfg.n_layers - 1}):
            for draft_tokens in (1, 5):
                stats = DraftStats()
                drafted = list(model.generate([5, 2, 9], 70, temperature=0, draft_layers=draft_layers,
                                              draft_tokens=draft_tokens, stats=stats))
                assert drafted == plain, (name, draft_layers, draft_tokens)
                assert 0 <= stats.accepted <= stats.drafted and stats.rounds > 0


def test_a_draft_that_is_the_whole_model_is_always_accepted():
    """With the last layers contributing nothing, the draft's distribution is the full model's."""
    model = small_model(n_layers=3)
    with torch.no_grad():
        for layer in model.blocks[2:]:
            layer.mixer.out.weight.zero_()
            layer.ffn.down.weight.zero_()
    for temperature in (0.0, 1.0):
        stats = DraftStats()
        list(model.generate([1], 40, temperature=temperature, draft_layers=2, draft_tokens=4, stats=stats,
                            generator=torch.Generator().manual_seed(0)))
        assert stats.accepted == stats.drafted > 0


def test_accept_or_replace_emits_the_target_distribution():
    """Speculative sampling: whatever the draft q, the emitted token is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.1, 0.3])
    n, counts, kept = 20000, torch.zeros(5), 0
    for draft in torch.multinomial(q, n, replacement=True, generator=g).tolist():
        accepted, token = accept_or_replace(p, q, draft, g)
        counts[token] += 1
        kept += accepted
    frequencies = counts / n
    assert (frequencies - p).abs().max() < 5 * (p * (1 - p) / n).sqrt().max()  # 5 standard errors
    # Acceptance is sum_x min(p(x), q(x)) = 0.1 + 0.2 + 0.1 + 0.1 + 0.05 = 0.55.
    assert abs(kept / n - 0.55) < 0.02


def test_sampled_self_speculative_decoding_is_deterministic_with_a_seed():
    model = small_model(n_layers=3)
    run = lambda seed: list(model.generate([1, 2], 50, temperature=1.0, top_k=20, draft_layers=1,
                                           generator=torch.Generator().manual_seed(seed)))
    assert run(3) == run(3) and run(3) != run(4)


def test_copy_state_lets_every_mixer_resume_from_an_earlier_state():
    """The rewind contract: a state copied before a step still continues as if that step never ran."""
    for spec in list(DRAFT_STACKS.values()) + [{"mixer": {"kind": "retention"}},
                                                {"mixer": {"kind": "multichannel", "channels": 2}}]:
        model = small_model(**spec)
        x = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            state = model.init_state(2, 48)
            _, state = model.step(x[:, :10], state)
            before = copy_state(state)
            model.step(x[:, 10:20], state)  # a step the copy must not see
            resumed = model.step(x[:, 20:], before)[0]
            fresh = model.init_state(2, 48)
            model.step(x[:, :10], fresh)
            expected = model.step(x[:, 20:], fresh)[0]
        torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def test_layer_dropout_rates_and_early_exit_weights():
    rates = layer_dropout_rates(0.2, 5)
    assert rates[0] == 0 and abs(rates[-1] - 0.2) < 1e-12 and rates == sorted(rates)
    assert early_exit_weights(0.0, 4) == [0, 0, 0, 1]
    weights = early_exit_weights(1.0, 4)  # e_l = 0, 1, 3 and 3 + 3
    assert abs(sum(weights) - 1) < 1e-12 and weights == [0, 1 / 10, 3 / 10, 6 / 10]


def test_early_exit_objective_is_the_weighted_sum_of_every_exit_cross_entropy():
    model = small_model(n_layers=3, early_exit_loss=1.0).train()
    x = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(2))
    inputs, targets = x[:, :-1], x[:, 1:]
    objective = model.loss(inputs, targets)
    ce = [F.cross_entropy(model(inputs, exit_layer=e).flatten(0, 1), targets.flatten()) for e in (1, 2, 3)]
    expected = sum(w * c for w, c in zip(early_exit_weights(1.0, 3), ce))
    torch.testing.assert_close(objective, expected)
    model.eval()
    model(inputs)
    assert model.exits is None  # nothing kept outside training


def test_exit_layer_scores_with_the_first_layers_and_the_shared_head():
    model = small_model(n_layers=3)
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = embedded = model.embed(x)
        for layer in model.blocks[:2]:
            h = layer(h, embedded, x)
        torch.testing.assert_close(model(x, exit_layer=2), model.logits(h), rtol=0, atol=0)


def test_layer_dropout_skips_whole_sequences():
    model = small_model(n_layers=2)
    layer = model.blocks[1]
    h = torch.randn(64, 10, 32)
    tokens = torch.zeros(64, 10, dtype=torch.long)
    torch.manual_seed(0)
    out = skip_rows(layer, h, h, tokens, 0.5)
    with torch.no_grad():
        full = layer(h, h, tokens)
    skipped = (out == h).all(-1).all(-1)
    assert 16 < skipped.sum() < 48
    torch.testing.assert_close(out[~skipped], full[~skipped])
    assert torch.equal(skip_rows(layer, h, h, tokens, 1.0), h)
    # In training, a model with layer dropout gives identical sequences different outputs (each skips
    # its own depths); in eval it runs every depth.
    model = small_model(n_layers=4, layer_dropout=0.9).train()
    torch.manual_seed(1)
    same = torch.zeros(8, 6, dtype=torch.long)
    outputs = model(same).detach()
    assert len({tuple(row.flatten().tolist()) for row in outputs}) > 1
    model.eval()
    outputs = model(same)
    assert all(torch.equal(row, outputs[0]) for row in outputs)


def test_generate_with_draft_layers_through_the_cli(tiny_run):
    plain = seedbed("generate", str(tiny_run), "--prompt", "KING", "--tokens", "80", "--temperature", "0")
    drafted = seedbed("generate", str(tiny_run), "--prompt", "KING", "--tokens", "80", "--temperature", "0",
                      "--draft-layers", "1", "--draft-tokens", "3")
    assert plain.returncode == drafted.returncode == 0
    assert drafted.stdout == plain.stdout and len(plain.stdout) > 60
    assert "drafts accepted" in drafted.stderr
    assert_one_line_error(seedbed("generate", str(tiny_run), "--prompt", "KING", "--draft-layers", "2"),
                          "--draft-layers must be between 1 and 1")
