"""DeepSeekMoE feed-forward: routing, batched dispatch == per-token loop, balance loss, capacity."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seedbed.config import ModelConfig, resolve_config
from seedbed.errors import UserError
from seedbed.model import LM
from seedbed.model.layers import BuildContext
from seedbed.model import moe
from seedbed.model.moe import MoE
from seedbed.registry import FFNS
from seedbed.train.trainer import Trainer

D = 16
CTX = BuildContext(d_model=D, n_layers=1, layer_index=0, max_seq_len=64,
                   linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})


def layer(seed: int = 0, **options) -> MoE:
    """A layer whose every weight is perturbed, so the zero-initialised down-projections matter."""
    torch.manual_seed(seed)
    ffn = MoE(FFNS.options({"kind": "moe", **options}, "test")[1], CTX)
    with torch.no_grad():
        for p in ffn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ffn


def inputs(batch: int = 2, length: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations and distinct token ids, so an expert's hook can tell which tokens it saw."""
    x = torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))
    return x, torch.arange(batch * length).view(batch, length)


@pytest.fixture
def unpadded(monkeypatch):
    """Training runs each expert on exactly its own rows (no padding), so hooks see only real tokens."""
    monkeypatch.setattr(moe, "ROW_BUCKET", 1)


def record_tokens(experts) -> list[list[int]]:
    """Hook every expert; the returned lists fill with the token ids each one is run on."""
    seen = [[] for _ in experts]
    for expert, log in zip(experts, seen):
        expert.register_forward_hook(lambda module, args, out, log=log: log.extend(args[1].reshape(-1).tolist()))
    return seen


def router_choices(ffn: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(x.reshape(-1, D) @ ffn.router.weight.T, dim=-1)
    return probs, probs.topk(ffn.top_k, dim=-1).indices


def test_each_token_goes_to_its_top_k_routed_experts_and_every_shared_one(unpadded):
    ffn = layer(n_routed=6, n_shared=2, top_k=3)
    x, tokens = inputs()
    routed_seen, shared_seen = record_tokens(ffn.routed), record_tokens(ffn.shared)
    with torch.no_grad():
        ffn(x, tokens)
    _, choices = router_choices(ffn, x)
    for token in range(tokens.numel()):
        experts = {e for e, seen in enumerate(routed_seen) if token in seen}
        assert experts == set(choices[token].tolist()) and len(experts) == 3
    assert all(sorted(seen) == list(range(tokens.numel())) for seen in shared_seen)
    assert sum(len(seen) for seen in routed_seen) == 3 * tokens.numel()  # no token twice in one expert


@pytest.mark.parametrize("options", [{}, {"n_routed": 5, "n_shared": 0, "top_k": 3, "activation": "silu"},
                                     {"n_routed": 4, "capacity_factor": 0.6}])
def test_batched_dispatch_equals_per_token_reference(options):
    fast, ref = layer(**options), layer(**options, reference=True)
    ref.load_state_dict(fast.state_dict())
    x, tokens = inputs()
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for ffn in (fast, ref):
        ffn.train()
        xi = x.clone().requires_grad_()
        out = ffn(xi, tokens)
        ((out * cotangent).sum() + ffn.aux_loss).backward()
        results.append((out, xi.grad, {name: p.grad for name, p in ffn.named_parameters()}, ffn.aux_loss))
    (out_a, dx_a, grads_a, aux_a), (out_b, dx_b, grads_b, aux_b) = results
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    close(out_a, out_b)
    close(dx_a, dx_b)
    close(aux_a, aux_b)
    for name in grads_a:
        close(grads_a[name], grads_b[name])
    assert torch.equal(fast.drop_fraction, ref.drop_fraction)
    if options.get("capacity_factor"):
        assert fast.drop_fraction > 0, "the capacity case should drop something"


def test_training_pads_each_expert_slice_to_a_bucket_and_changes_no_real_row():
    ffn = layer(n_routed=4, n_shared=1, top_k=2)
    x, tokens = inputs(length=37)
    rows = [[] for _ in ffn.routed]
    for expert, log in zip(ffn.routed, rows):
        expert.register_forward_hook(lambda module, args, out, log=log: log.append(args[0].shape[1]))
    with torch.no_grad():
        padded = ffn.train()(x, tokens)
        exact = ffn.eval()(x, tokens)
    training_rows, eval_rows = rows[0][0::2] + rows[1][0::2], rows[0][1::2] + rows[1][1::2]
    assert all(n % moe.ROW_BUCKET == 0 for n in training_rows) and training_rows != eval_rows
    torch.testing.assert_close(padded, exact, rtol=1e-6, atol=1e-6)


def test_balance_loss_and_expert_load_follow_the_formula():
    ffn = layer(n_routed=5, top_k=2, balance_coef=0.03).train()
    x, tokens = inputs(length=30)
    ffn(x, tokens)
    probs, choices = router_choices(ffn, x)
    counts = [sum(int(e) == i for row in choices for e in row) for i in range(5)]
    load = torch.tensor([c / (2 * 60) for c in counts])
    expected = 0.03 * 5 * sum(load[i] * probs[:, i].mean() for i in range(5))
    torch.testing.assert_close(ffn.aux_loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ffn.expert_load, load)
    assert ffn.expert_load.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert not ffn.expert_load.requires_grad
    ffn.eval()
    ffn(x, tokens)
    assert ffn.aux_loss is None, "no balance loss outside training"


def test_balance_loss_is_coef_for_a_uniform_router_and_near_n_routed_coef_for_a_collapsed_one():
    ffn = layer(n_routed=8, top_k=1, balance_coef=0.01).train()
    x, tokens = inputs()
    with torch.no_grad():
        ffn.router.weight.zero_()  # every probability is exactly 1/8
    ffn(x, tokens)
    assert ffn.aux_loss.item() == pytest.approx(0.01, rel=1e-6)
    with torch.no_grad():
        ffn.router.weight[3, 0] = 1000.0  # expert 3 wins every token with x_0 > 0
    ffn(x.abs(), tokens)
    assert ffn.expert_load[3] == 1
    assert ffn.aux_loss.item() == pytest.approx(0.08, rel=1e-3)


def test_capacity_keeps_the_earliest_assignments_of_each_expert_and_drops_only_the_rest(unpadded):
    ffn = layer(n_routed=4, n_shared=1, top_k=2, capacity_factor=0.5).train()
    x, tokens = inputs()
    n = tokens.numel()
    capacity = math.ceil(0.5 * n * 2 / 4)
    seen = record_tokens(ffn.routed)
    with torch.no_grad():
        out = ffn(x, tokens).reshape(n, D)
    _, choices = router_choices(ffn, x)
    priority = [(j, t) for j in range(2) for t in range(n)]  # first choices first, then token order
    kept = set()
    for expert in range(4):
        assigned = [t for j, t in priority if choices[t, j] == expert]
        assert seen[expert] == assigned[:capacity], f"expert {expert} kept the wrong assignments"
        assert len(seen[expert]) <= capacity
        kept |= {(t, expert) for t in assigned[:capacity]}
    dropped = 2 * n - len(kept)
    assert dropped > 0 and ffn.drop_fraction.item() == pytest.approx(dropped / (2 * n))
    # A token whose both choices were dropped still gets the shared expert, and only it.
    orphans = [t for t in range(n) if not any((t, int(e)) in kept for e in choices[t])]
    assert orphans, "choose a capacity that drops some token entirely"
    with torch.no_grad():
        shared = ffn.shared[0](x, tokens).reshape(n, D)
    torch.testing.assert_close(out[orphans], shared[orphans])


def test_capacity_is_off_in_eval_mode():
    limited, free = layer(capacity_factor=0.25), layer()
    x, tokens = inputs()
    with torch.no_grad():
        torch.testing.assert_close(limited.eval()(x, tokens), free.eval()(x, tokens), rtol=0, atol=0)
    assert limited.drop_fraction == 0


def test_lm_loss_adds_the_balance_loss_only_in_training():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, max_seq_len=16,
                           mixer={"kind": "attention", "n_heads": 4}, ffn={"kind": "moe", "balance_coef": 0.5}))
    tokens = torch.randint(0, 61, (2, 16))
    targets = torch.randint(0, 61, (2, 16))
    model.train()
    loss = model.loss(tokens, targets)
    cross_entropy = F.cross_entropy(model(tokens).reshape(-1, 61), targets.reshape(-1))
    aux = sum(block.ffn.aux_loss for block in model.blocks)
    assert 0 < aux.item() <= 2 * 0.5 * 8  # two layers, each at most balance_coef * n_routed
    torch.testing.assert_close(loss, cross_entropy + aux)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.loss(tokens, targets), cross_entropy)


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match="top_k must be between 1 and n_routed=4"):
        FFNS.options({"kind": "moe", "n_routed": 4, "top_k": 5}, "model.ffn")
    with pytest.raises(UserError, match="expert cannot be moe"):
        FFNS.options({"kind": "moe", "expert": "moe"}, "model.ffn")
    with pytest.raises(UserError, match="unknown config key model.ffn.expert_options.width"):
        FFNS.options({"kind": "moe", "expert_options": {"width": 3}}, "model.ffn")


def test_expert_options_reach_the_experts():
    ffn = layer(n_routed=3, expert_mult=0.25, expert_options={"activation": "gelu"})
    assert ffn.routed[0].up.weight.shape == (4, D) and ffn.shared[0].down.weight.shape == (D, 4)
    assert ffn.routed[2].activation is F.gelu
    assert ffn.router.weight.shape == (3, D)


@pytest.mark.skipif("kan" not in FFNS.names(), reason="the kan feed-forward is not registered yet")
def test_kan_experts_dispatch_equals_reference():
    fast, ref = layer(n_routed=4, expert="kan"), layer(n_routed=4, expert="kan", reference=True)
    ref.load_state_dict(fast.state_dict())
    x, tokens = inputs(length=8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, tokens), ref(x, tokens), rtol=1e-5, atol=1e-5)
    assert type(fast.routed[0]) is FFNS.get("kan", "test").cls


def tiny_moe_config(corpus: Path, steps: int, **moe_options):
    cfg = resolve_config("gpt", overrides=[
        "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=4", "train.eval_tokens=2000", "train.log_every=2", "train.warmup_steps=2",
        "train.dtype=fp32", "train.threads=1", "train.device=cpu", f"train.steps={steps}", f'data.spec="{corpus}"'])
    cfg.model.ffn = {"kind": "moe", "n_routed": 4, "top_k": 2, **moe_options}
    return cfg


def test_trainer_logs_expert_load_and_balance_loss(small_corpus, tmp_path):
    Trainer(tiny_moe_config(small_corpus, 4, capacity_factor=1.0), tmp_path / "run", progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        assert 0 <= r["moe_load_min"] <= 0.25 <= r["moe_load_max"] <= 1
        assert 0 <= r["moe_drop_fraction"] < 1
        assert 0 < r["moe_aux_loss"] <= 2 * 0.01 * 4  # two layers, each at most balance_coef * n_routed


def test_trainer_backpropagates_the_balance_loss(small_corpus, tmp_path):
    """Same seed and batch: only the balance coefficient differs, so only it can move the routers apart."""
    routers = []
    for coef in (0.0, 1.0):
        trainer = Trainer(tiny_moe_config(small_corpus, 1, balance_coef=coef), tmp_path / str(coef), progress=False)
        loss = trainer.train_step()
        routers.append((loss, trainer.model.blocks[1].ffn.router.weight.detach().clone()))
    (loss_off, router_off), (loss_on, router_on) = routers
    assert loss_off == loss_on, "the logged loss is the cross-entropy alone"
    assert not torch.allclose(router_off, router_on)
