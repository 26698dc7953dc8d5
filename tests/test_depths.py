"""Mixture of depths (model/depths.py) and mixture of depths and experts (MoDE, model/moe.py).

Causality in eval mode and step == parallel are the shared tests' (test_model.py STACKS); here:
which tokens run a routed block, that eval never ranks tokens over the sequence, the router's
gradient and auxiliary loss, the counted FLOPs, and MoDE's no-op expert.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_flops import counted_training_flops
from test_model import small_model

from seedbed.config import ModelConfig
from seedbed.errors import UserError
from seedbed.model import LM
from seedbed.model.depths import DepthRouter, depth_routing_metrics
from seedbed.model.moe import MoE
from seedbed.perf import training_flops_per_token


def routed_model(capacity=0.25, ffn=None, **routing) -> LM:
    """Three layers, the middle one routed."""
    return small_model(n_layers=3, pattern=["default", "routed", "default"], ffn=ffn,
                       blocks={"routed": {"mixture_of_depths": {"capacity": capacity, **routing}}})


def layer_io(model: LM, tokens: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream entering and leaving layer ``depth`` in one forward."""
    seen = {}
    handle = model.blocks[depth].register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
    model(tokens)
    handle.remove()
    return seen["h"], seen["out"]


def tokens(batch=3, length=40, seed=0) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_training_runs_the_block_on_the_top_capacity_tokens_of_each_row_only():
    model = routed_model(capacity=0.25).train()
    x = tokens()
    h, out = layer_io(model, x, 1)
    router = model.blocks[1].depth_router
    logits = router.router(F.rms_norm(h, (h.shape[-1],))).squeeze(-1)
    k = math.ceil(0.25 * x.shape[1])
    top = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(k, dim=1).indices, True)
    changed = (out != h).any(-1)
    assert torch.equal(changed, top), "exactly the top-k tokens of each row change"
    assert torch.equal(out[~top], h[~top])  # the others ride the residual, bit for bit
    assert depth_routing_metrics(model)["mod_picked_fraction"] == pytest.approx(k / x.shape[1])


@pytest.mark.parametrize("causal", ["router", "predictor"])
def test_eval_uses_the_causal_decision_and_never_ranks_the_sequence(causal, monkeypatch):
    model = routed_model(capacity=0.25, causal=causal)
    calls = []
    original = DepthRouter.top_k
    monkeypatch.setattr(DepthRouter, "top_k", lambda self, logits: calls.append(1) or original(self, logits))
    x = tokens()
    with torch.no_grad():
        h, out = layer_io(model, x, 1)
    assert calls == [], "eval mode must not rank tokens over the sequence"
    router = model.blocks[1].depth_router
    u = F.rms_norm(h, (h.shape[-1],))
    decider = router.router if causal == "router" else router.predictor
    picked = decider(u).squeeze(-1) > 0
    assert 0 < picked.sum() < picked.numel()
    assert torch.equal((out != h).any(-1), picked)
    model.train()
    model(x)
    assert calls == [1], "training ranks once per routed block"


def test_router_weight_scales_the_change_and_takes_the_lm_gradient():
    model = routed_model(capacity=0.5, aux_coef=0.0).train()
    model.loss(tokens()[:, :-1], tokens()[:, 1:]).backward()
    assert model.blocks[1].depth_router.router.weight.grad.abs().sum() > 0
    # The change a picked token gets is sigmoid(r) times the block's own change.
    model.eval()
    layer = model.blocks[1]
    with torch.no_grad():
        h = torch.randn(1, 12, 32)
        picked, weight = layer.depth_router(h)
        full = layer.run_block(h, h, torch.zeros(1, 12, dtype=torch.long), None)[0]
        out = layer(h, h, torch.zeros(1, 12, dtype=torch.long))
    first = int(picked[0].nonzero()[0])  # the first picked token sees the same prefix either way
    torch.testing.assert_close(out[0, first], h[0, first] + weight[0, first] * (full[0, first] - h[0, first]))


def test_auxiliary_loss_is_the_bce_of_the_causal_decision_against_top_k():
    model = routed_model(capacity=0.25, aux_coef=0.3).train()
    x = tokens()
    h, _ = layer_io(model, x, 1)
    router = model.blocks[1].depth_router
    logits = router.router(F.rms_norm(h, (h.shape[-1],))).squeeze(-1)
    top = router.top_k(logits)
    expected = 0.3 * F.binary_cross_entropy_with_logits(logits, top.float())
    torch.testing.assert_close(router.aux_loss, expected)
    assert router.disagreement == ((logits > 0) != top).float().mean()
    model.eval()
    model(x)
    assert router.aux_loss is None and router.disagreement is None


def test_a_short_training_teaches_the_causal_decision_to_agree_with_top_k():
    model = routed_model(capacity=0.25, aux_coef=1.0).train()
    with torch.no_grad():
        model.blocks[1].depth_router.router.bias.fill_(3.0)  # the causal decision starts by picking every token
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(batch=8, length=33, seed=3)
    disagreement = []
    for _ in range(40):
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        disagreement.append(float(model.blocks[1].depth_router.disagreement))
    assert disagreement[0] > 0.6 and max(disagreement[-5:]) < 0.1, disagreement


def test_training_flops_count_the_block_at_its_capacity():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, max_seq_len=32, pattern=["default", "routed"],
                      blocks={"routed": {"mixture_of_depths": {"capacity": 0.25, "causal": "predictor"}}})
    model = LM(cfg).train()
    x = torch.randint(0, 97, (2, 33))
    counted = counted_training_flops(model, x)
    assert training_flops_per_token(model, 32, 2) * 64 == pytest.approx(counted, rel=0.10)
    dense = LM(ModelConfig(vocab_size=97, d_model=64, n_layers=2, max_seq_len=32))
    assert training_flops_per_token(model, 32, 2) < 0.75 * training_flops_per_token(dense, 32, 2)


def test_integrated_mode_noop_expert_leaves_a_token_unchanged():
    """MoDE, integrated: a token routed only to the no-op expert gets nothing from the feed-forward,
    so an FFN-only block leaves it exactly as it was; the others get their experts' output, as the
    per-token reference computes it."""
    model = small_model(n_layers=1, mixer={"kind": "none"},
                        ffn={"kind": "moe", "n_routed": 3, "n_shared": 0, "top_k": 1, "noop_experts": 1})
    moe = model.blocks[0].ffn
    assert isinstance(moe, MoE) and moe.router.weight.shape[0] == 4
    h = torch.randn(2, 30, 32)
    x = torch.zeros(2, 30, dtype=torch.long)
    with torch.no_grad():
        out = model.blocks[0](h, h, x)
        choice = moe.router(model.blocks[0].ffn_norm(h)).argmax(-1)
        skipped = choice == 3
        assert 0 < skipped.sum() < skipped.numel()
        assert torch.equal(out[skipped], h[skipped])
        assert not torch.isclose(out[~skipped], h[~skipped]).all(-1).any()
        moe.reference = True
        torch.testing.assert_close(model.blocks[0](h, h, x), out)
    assert moe.expert_load.shape == (4,) and moe.expert_load[3] == skipped.float().mean()


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match=r"mixture_of_depths.capacity must be in \[0, 1\]"):
        routed_model(capacity=1.5)
    with pytest.raises(UserError, match="train_decision must be one of topk, causal"):
        routed_model(train_decision="sometimes")
    with pytest.raises(UserError, match="unknown config key model.blocks.routed.mixture_of_depths.capcity"):
        small_model(n_layers=1, pattern=["routed"], blocks={"routed": {"mixture_of_depths": {"capcity": 0.1}}})
    with pytest.raises(UserError, match="a local block runs over whole groups"):
        small_model(n_layers=1, mixer={"kind": "hourglass", "inner": ["local", "transformer"]}, ffn={"kind": "none"},
                    blocks={"local": {"scope": "local", "mixer": {"kind": "attention"},
                                      "mixture_of_depths": {"capacity": 0.5}}})
    with pytest.raises(UserError, match="top_k must be between 1 and n_routed=2 \\+ noop_experts=1"):
        small_model(ffn={"kind": "moe", "n_routed": 2, "noop_experts": 1, "top_k": 4})
