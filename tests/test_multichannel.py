"""Multi-channel attention (model/multichannel.py): s attention + MLP channels merged into one delta."""

import pytest
import torch

from seedbed.config import ModelConfig
from seedbed.errors import UserError
from seedbed.model import LM
from seedbed.model.layers import BuildContext
from seedbed.model.multichannel import MultiChannelAttention
from seedbed.perf import training_flops_per_token
from seedbed.registry import MIXERS
from test_flops import counted_training_flops

D = 32


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised projections (and the zero score) would hide bugs: move every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def mixer(seed: int = 0, **options) -> MultiChannelAttention:
    """A standalone mixer on d_model 32 with dense linears, every parameter perturbed."""
    torch.manual_seed(seed)
    entry, opts = MIXERS.options({"kind": "multichannel", **options}, "model.mixer")
    ctx = BuildContext(D, 1, 0, 48, {"kind": "dense"}, {"kind": "rmsnorm"})
    module = entry.cls(opts, ctx)
    perturb(module, seed)
    return module.eval()


def residual(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def plain_name(name: str) -> str:
    """A parameter of the plain attention + MLP model, named as in the one-channel model."""
    for plain, channel in ((".mixer_norm.", ".mixer.attention_norms.0."), (".mixer.", ".mixer.attentions.0."),
                           (".ffn_norm.", ".mixer.mlp_norms.0."), (".ffn.", ".mixer.mlps.0.")):
        if plain in name:
            return name.replace(plain, channel)
    return name


@pytest.mark.parametrize("merge", ["softmax", "mean", "max"])
def test_one_channel_is_the_plain_attention_mlp_block(merge):
    common = {"vocab_size": 61, "d_model": D, "n_layers": 2, "max_seq_len": 48}
    torch.manual_seed(0)
    plain = LM(ModelConfig(**common, mixer={"kind": "attention", "n_heads": 4, "qk_norm": True},
                           ffn={"kind": "mlp", "mult": 4.0})).eval()
    perturb(plain)
    torch.manual_seed(1)
    channel = LM(ModelConfig(**common, mixer={"kind": "multichannel", "channels": 1, "merge": merge},
                             ffn={"kind": "none"})).eval()
    perturb(channel, seed=1)  # the score too: with one channel it must not matter
    weights = {plain_name(name): p for name, p in plain.state_dict().items()}
    extra = set(channel.state_dict()) - set(weights)
    assert extra == ({f"blocks.{i}.mixer.score" for i in range(2)} if merge == "softmax" else set())
    for name in extra:
        weights[name] = channel.state_dict()[name]
    channel.load_state_dict(weights, strict=True)
    tokens = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(channel(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_softmax_merge_starts_as_the_mean():
    torch.manual_seed(0)
    ctx = BuildContext(D, 1, 0, 48, {"kind": "dense"}, {"kind": "rmsnorm"})
    softmax = MultiChannelAttention(MultiChannelAttention.Options(channels=3), ctx)
    assert softmax.score.abs().max() == 0
    mean = MultiChannelAttention(MultiChannelAttention.Options(channels=3, merge="mean"), ctx)
    perturb(mean)  # the channels are not zero; the score stays as built
    state = mean.state_dict()
    softmax.load_state_dict({**state, "score": softmax.score.detach()})
    h = residual()
    with torch.no_grad():
        out = softmax(h)
        torch.testing.assert_close(out, mean(h), rtol=1e-6, atol=1e-6)
        assert out.abs().max() > 1e-3


def test_softmax_merge_is_a_convex_combination_of_the_channels():
    module = mixer(channels=3, merge="softmax")
    with torch.no_grad():
        module.score.copy_(torch.randn(D, generator=torch.Generator().manual_seed(3)))
        h = residual()
        y = module.channel_outputs(h)
        w = module.merge_weights(y)
        out = module(h)
    assert y.shape == (2, 12, 3, D) and w.shape == (2, 12, 3)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 12))
    assert w.std(-1).min() > 1e-3, "a non-zero score should weigh the channels unequally"
    torch.testing.assert_close(out, (w.unsqueeze(-1) * y).sum(-2))
    assert (out >= y.amin(-2) - 1e-6).all() and (out <= y.amax(-2) + 1e-6).all()
    # It differs from the mean once the score has been moved.
    assert not torch.allclose(out, y.mean(-2), atol=1e-4)


def test_max_and_mean_merges():
    h = residual()
    for merge, reduce in (("max", lambda y: y.amax(-2)), ("mean", lambda y: y.mean(-2))):
        module = mixer(channels=3, merge=merge)
        assert module.score is None
        with torch.no_grad():
            torch.testing.assert_close(module(h), reduce(module.channel_outputs(h)), rtol=0, atol=0)


def test_channel_widths_follow_width_mult_and_mult():
    for channels, width_mult, mlp_mult, hidden in ((2, 1.0, 4.0, 64), (3, 1.5, 4.0, 64), (4, 2.0, 3.0, 48),
                                                   (3, 1.0, 4.0, 43)):
        module = mixer(channels=channels, width_mult=width_mult, mlp_mult=mlp_mult)
        assert hidden == round(width_mult * mlp_mult * D / channels)
        assert len(module.mlps) == len(module.attentions) == channels
        for mlp in module.mlps:
            assert mlp.up.weight.shape == (hidden, D) and mlp.down.weight.shape == (D, hidden)
        assert module.shared_mlp is None


def test_shared_variant_parameter_counts():
    # Each of the 2 channels: 64 hidden units, a quarter of them (16) in the one shared MLP.
    module = mixer(channels=2, shared_fraction=0.25)
    assert (module.own_hidden, module.shared_hidden) == (48, 16)
    assert all(mlp.up.weight.shape == (48, D) for mlp in module.mlps)
    assert module.shared_mlp.up.weight.shape == (16, D) and module.shared_mlp.down.weight.shape == (D, 16)
    attention = 4 * D * D + 2 * (D // 4)  # q, k, v, out and the two qk-norm gains
    norms = 2 * D
    expected = 2 * (attention + norms + 2 * D * 48) + 2 * D * 16 + D  # ... + the shared MLP + the score
    assert sum(p.numel() for p in module.parameters()) == expected
    # Unshared, each channel holds its 16 units itself: one more copy of them.
    assert sum(p.numel() for p in mixer(channels=2).parameters()) == expected + 2 * D * 16
    # Three channels: 43 units each, round(0.75 * 43) = 32 own and round(0.25 * 43) = 11 shared.
    three = mixer(channels=3, shared_fraction=0.25)
    assert (three.own_hidden, three.shared_hidden) == (32, 11)
    assert three.shared_mlp.up.weight.shape == (11, D)


def test_shared_mlp_serves_every_channel():
    """Moving the shared MLP's weight moves every channel's output (and no attention output), and
    its gradient is the sum over the channels of the gradient through each one."""
    module = mixer(channels=3, shared_fraction=0.5, merge="mean")
    h = residual()
    with torch.no_grad():
        before = module.channel_outputs(h)
        module.shared_mlp.down.weight.add_(0.5)
        after = module.channel_outputs(h)
    moved = (after - before).abs().amax(dim=(0, 1, 3))
    assert (moved > 1e-3).all(), f"a channel did not move with the shared MLP: {moved}"

    # In float64, so that the two sums' rounding stays far below any real difference.
    module, h = module.double(), h.double()
    g = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    module.zero_grad()
    (module(h) * g).sum().backward()
    shared = list(module.shared_mlp.parameters())
    total = [p.grad.clone() for p in shared]
    # By hand: each channel's MLP input, fixed, through the shared MLP; the mean passes g / 3 to every y_i.
    per_channel = []
    for i in range(3):
        with torch.no_grad():
            u = module.mlp_norms[i](h + module.attentions[i](module.attention_norms[i](h)))
        per_channel.append(torch.autograd.grad((module.shared_mlp(u, None) * g / 3).sum(), shared))
    for j, grad in enumerate(total):
        parts = [c[j] for c in per_channel]
        assert all(p.abs().max() > 0 for p in parts)
        torch.testing.assert_close(grad, sum(parts), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options,key", [
    ({"channels": 0}, "channels"), ({"merge": "median"}, "merge"), ({"shared_fraction": 1.0}, "shared_fraction"),
    ({"shared_fraction": -0.1}, "shared_fraction"), ({"width_mult": 0.0}, "width_mult"),
    ({"mlp_mult": -1.0}, "mlp_mult"), ({"activation": "tanh"}, "activation"), ({"n_heads": 0}, "n_heads"),
    ({"channels": 2.5}, "channels"), ({"heads": 4}, "heads"),
])
def test_bad_options_are_one_line_errors_naming_the_key(options, key):
    with pytest.raises(UserError, match=f"model.mixer.{key}") as error:
        MIXERS.options({"kind": "multichannel", **options}, "model.mixer")
    assert "\n" not in str(error.value)


def test_too_narrow_channels_and_bad_heads_are_errors_at_build():
    with pytest.raises(UserError, match="hidden units"):
        mixer(channels=4, mlp_mult=0.05)
    with pytest.raises(UserError, match="n_heads=5"):
        mixer(n_heads=5)


def test_step_by_step_equals_parallel_with_three_channels_shared_mlp_and_max():
    module = mixer(channels=3, shared_fraction=0.3, merge="max", n_kv_heads=2)
    h = residual(batch=2, length=20)
    with torch.no_grad():
        full = module(h)
        state = module.init_state(2, 20, h.device, h.dtype)
        assert len(state) == 3
        singles = [module.step(h[:, t:t + 1], state)[0] for t in range(20)]
        torch.testing.assert_close(torch.cat(singles, 1), full, rtol=1e-5, atol=1e-5)
        state = module.init_state(2, 20, h.device, h.dtype)
        head, state = module.step(h[:, :13], state)
        tail = [module.step(h[:, t:t + 1], state)[0] for t in range(13, 20)]
        torch.testing.assert_close(torch.cat([head] + tail, 1), full, rtol=1e-5, atol=1e-5)
    assert all(s["pos"] == 20 for s in state)


def test_model_with_multichannel_blocks_and_an_ffn_after_them():
    """In a model: a block with ffn none, a block whose ffn runs after the channels; decoding matches,
    and the layer adds no norm of its own before the mixer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=D, n_layers=2, max_seq_len=24,
                      mixer={"kind": "multichannel", "channels": 2, "shared_fraction": 0.5},
                      ffn={"kind": "none"}, depths={"1": "with_ffn"},
                      blocks={"with_ffn": {"ffn": {"kind": "mlp"}}})
    model = LM(cfg).eval()
    perturb(model)
    assert model.blocks[0].mixer_norm is None and model.blocks[0].ffn is None
    assert model.blocks[1].ffn is not None
    tokens = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(2, 24)
        head, state = model.step(tokens[:, :10], state)
        tail = [model.step(tokens[:, t:t + 1], state)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat([head] + tail, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer_spec,linear", [
    ({"kind": "multichannel", "channels": 3, "shared_fraction": 0.3}, {"kind": "dense"}),
    ({"kind": "multichannel", "channels": 3, "shared_fraction": 0.3, "merge": "max"}, {"kind": "dense"}),
    # Per-call weights (B A formed in every call): the shared MLP is one call over all the channels.
    ({"kind": "multichannel", "channels": 2, "shared_fraction": 0.5}, {"kind": "orthogonal-lora", "rank": 8}),
], ids=["shared-softmax", "shared-max", "shared-orthogonal-lora"])
def test_counted_flops_of_the_shared_variants(mixer_spec, linear):
    """test_flops.py checks the default options; the shared MLP and the score's matmul here, to 1%."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, max_seq_len=16, mixer=mixer_spec,
                      ffn={"kind": "none"}, linear=linear)
    model = LM(cfg).train()
    tokens = torch.randint(0, 97, (2, 17))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counted = counted_training_flops(model, tokens)
    finally:
        torch.set_num_threads(threads)
    assert training_flops_per_token(model, 16, 2) * 2 * 16 == pytest.approx(counted, rel=0.01)
