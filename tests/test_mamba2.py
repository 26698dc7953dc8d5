"""Mamba-2: the sequential and chunked SSD forms agree, stay finite on long sequences, and decode in constant memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from seedbed.errors import UserError
from seedbed.model.layers import BuildContext
from seedbed.model.mamba2 import Mamba2, chunked_ssd, sequential_ssd
from seedbed.registry import MIXERS
from test_model import decode_three_ways

CTX = BuildContext(d_model=32, n_layers=1, layer_index=0, max_seq_len=64,
                   linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})


def layer(**options) -> Mamba2:
    """A Mamba-2 mixer (d_inner 64, 4 heads of 16), every parameter perturbed (the output projection starts at zero)."""
    torch.manual_seed(0)
    mixer = Mamba2(Mamba2.Options(**options), CTX)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mixer


def core_inputs(length: int, groups: int, heads: int = 4, head_dim: int = 8, d_state: int = 6, seed: int = 0):
    """Random x, dt, A, B, C and a non-zero carried-in state; decays exp(dt A) spread over (0.01, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, heads, head_dim, generator=g)
    dt = torch.rand(2, length, heads, generator=g) * 0.3 + 0.01
    A = -torch.linspace(1.0, 16.0, heads)
    B = torch.randn(2, length, groups, d_state, generator=g)
    C = torch.randn(2, length, groups, d_state, generator=g)
    state = torch.randn(2, heads, d_state, head_dim, generator=g)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("length,chunk", [(1, 8), (16, 8), (37, 8), (37, 64), (37, 1)])
def test_chunked_equals_sequential_on_outputs_states_and_gradients(length, chunk, groups):
    inputs = core_inputs(length, groups)
    g = torch.Generator().manual_seed(9)
    out_weight, state_weight = torch.randn(inputs[0].shape, generator=g), torch.randn(inputs[5].shape, generator=g)
    results = {}
    for name, form in {"sequential": sequential_ssd,
                       "chunked": lambda *args: chunked_ssd(*args, chunk_size=chunk)}.items():
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, final = form(*leaves)
        grads = torch.autograd.grad((y * out_weight).sum() + (final * state_weight).sum(), leaves)
        results[name] = (y, final, *grads)
    for got, want in zip(results["chunked"], results["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_long_sequence_with_strong_decays_is_finite_and_exact():
    """4096 positions, dt = 1 and A up to 16 (decay e^-16 per step) for 4000 of them, then dt = 1e-3.

    The running sum of dt A reaches -65536, where float32's spacing is 0.008: segment sums taken as
    differences of it would get the last chunks' decays (exp of about -0.01 to -1) wrong by ~1%.
    """
    length = 4096
    x, _, _, B, C, state = core_inputs(length, groups=2)
    A = -torch.tensor([1.0, 4.0, 16.0, 16.0])
    dt = torch.where(torch.arange(length) < 4000, 1.0, 1e-3)[None, :, None].expand(2, length, 4)
    y, final = chunked_ssd(x, dt, A, B, C, state, chunk_size=64)
    want_y, want_final = sequential_ssd(x, dt, A, B, C, state)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)


def test_long_sequence_layer_with_large_dt_has_finite_outputs_and_gradients():
    chunked, sequential = layer(), layer(form="sequential")
    for mixer in (chunked, sequential):
        with torch.no_grad():
            mixer.dt_bias.fill_(math.log(math.expm1(1.0)))  # dt ~ 1 before the projection's share
            mixer.A_log.copy_(torch.linspace(1.0, 16.0, 4).log())
    x = torch.randn(1, 4096, 32, generator=torch.Generator().manual_seed(1))
    y = chunked(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in chunked.parameters())
    with torch.no_grad():
        torch.testing.assert_close(y, sequential(x), rtol=1e-4, atol=1e-4)


def layer_reference(mixer: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations: torch's own convolution, then each head and position in turn."""
    b, length, _ = u.shape
    heads, P, G, N = mixer.n_heads, mixer.head_dim, mixer.n_groups, mixer.d_state
    z, xbc, dt = (u @ mixer.in_proj.weight.T).split([mixer.d_inner, mixer.conv_dim, heads], dim=-1)
    conv = F.conv1d(F.pad(xbc.transpose(1, 2), (mixer.kernel - 1, 0)), mixer.conv_weight, mixer.conv_bias,
                    groups=mixer.conv_dim)
    x, B, C = F.silu(conv).transpose(1, 2).split([mixer.d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias)
    A = -mixer.A_log.exp()
    h = torch.zeros(b, heads, N, P)
    y = torch.zeros(b, length, heads, P)
    for t in range(length):
        for head in range(heads):
            g = head // (heads // G)
            B_t, C_t, x_t = B[:, t, g * N:(g + 1) * N], C[:, t, g * N:(g + 1) * N], x[:, t, head * P:(head + 1) * P]
            step = dt[:, t, head, None, None]
            h[:, head] = (step * A[head]).exp() * h[:, head] + step * B_t[:, :, None] * x_t[:, None, :]
            y[:, t, head] = (C_t[:, :, None] * h[:, head]).sum(1) + mixer.D[head] * x_t
    gated = (y.reshape(b, length, -1) * F.silu(z)).view(b, length, G, -1)
    normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
    return normed.flatten(2) @ mixer.out.weight.T


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("form", ["chunked", "sequential"])
def test_layer_equals_docstring_equations(form, groups):
    mixer = layer(form=form, n_groups=groups, chunk_size=4)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), layer_reference(mixer, x), rtol=1e-4, atol=1e-4)


def test_layer_forms_agree_in_float32_and_under_bf16_autocast():
    chunked, sequential = layer(chunk_size=8, n_groups=2), layer(form="sequential", n_groups=2)
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = sequential(x)
        torch.testing.assert_close(chunked(x), want, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_chunked, got_sequential = chunked(x), sequential(x)
            state = chunked.init_state(2, 37, x.device, torch.bfloat16)
            chunked.step(x[:, :30], state)
            chunked.step(x[:, 30:31], state)
    assert got_chunked.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in state.values())
    # Only the projections run in bf16, identically in both forms: the outputs differ by float32 rounding
    # pushed across bf16's rounding boundaries by the output projection, a bf16 ulp here and there.
    torch.testing.assert_close(got_chunked, got_sequential, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert (got_chunked.float() - want).norm() / want.norm() < 0.03


def test_steps_and_prefills_equal_the_parallel_forward():
    # A prefill of 13 (not a multiple of 8), a second one carrying both states in, then single steps:
    # the convolution's window spans each boundary.
    full, singles, parts, single, chunked = decode_three_ways(layer(chunk_size=8), torch.randn(2, 45, 32), [13, 40])
    for name in ("conv", "ssm"):
        torch.testing.assert_close(chunked[name], single[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(singles, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


def test_decode_state_does_not_grow_with_context():
    mixer = layer()
    x = torch.randn(1, 200, 32)
    state = mixer.init_state(1, 4, x.device, x.dtype)  # max_len is only a hint
    assert {k: v.shape for k, v in mixer.init_state(1, 100_000, x.device, x.dtype).items()} == \
        {k: v.shape for k, v in state.items()}
    shapes = {}
    with torch.no_grad():
        for t in range(200):
            mixer.step(x[:, t:t + 1], state)
            if t + 1 in (10, 200):
                shapes[t + 1] = {k: (v.shape, v.untyped_storage().nbytes()) for k, v in state.items()}
    assert shapes[10] == shapes[200]
    # conv: the last K - 1 = 3 inputs of x, B and C (64 + 2 * 16 channels); ssm: 4 heads of 16 x 16.
    assert shapes[200] == {"conv": ((1, 3, 96), 3 * 96 * 4), "ssm": ((1, 4, 16, 16), 4 * 16 * 16 * 4)}
    print(f"decode state: {sum(nbytes for _, nbytes in shapes[200].values())} bytes per sequence")


def test_gradients_reach_every_parameter():
    mixer = layer(n_groups=2, chunk_size=8)
    mixer(torch.randn(2, 21, 32)).square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    names = {name for name, _ in mixer.named_parameters()}
    assert {"A_log", "dt_bias", "D", "conv_weight", "conv_bias", "in_proj.weight", "out.weight"} <= names
    assert mixer.conv_weight.ndim == 3  # not a 2-D hidden matrix for Muon


def test_initialisation():
    torch.manual_seed(0)
    mixer = Mamba2(Mamba2.Options(n_groups=2, dt_min=0.002, dt_max=0.05), CTX)
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 0.002 - 1e-7).all() and (dt <= 0.05 + 1e-7).all()
    A = -mixer.A_log.exp()
    assert (A >= -16).all() and (A <= -1).all()
    assert (mixer.D == 1).all() and mixer.out.weight.abs().max() == 0
    assert mixer.norm.weight.shape == (32,)  # one gain per group of d_inner / n_groups channels


@pytest.mark.parametrize("form", ["chunked", "sequential"])
def test_flops_equal_the_counted_flops(form):
    mixer = layer(form=form, chunk_size=8, n_groups=2)
    x = torch.randn(3, 37, 32, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = mixer(x)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    counted = mixer.flops(3, 37)
    # x takes a gradient here as it does inside a model; the count covers the products, not elementwise work.
    assert (counted.forward, counted.backward) == (forward.get_total_flops(), backward.get_total_flops())


@pytest.mark.parametrize("options,message", [
    ({"head_dim": 24}, "head_dim=24 does not divide d_inner = expand \\* d_model = 64"),
    ({"n_groups": 3}, "n_groups=3 does not divide the 4 heads"),
    ({"form": "parallel"}, "form must be one of chunked, sequential"),
    ({"d_state": 0}, "d_state must be positive"),
    ({"chunk_size": -1}, "chunk_size must be positive"),
    ({"dt_min": 0.2}, "need 0 < dt_min <= dt_max, got dt_min=0.2, dt_max=0.1"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message) as error:
        entry, checked = MIXERS.options({"kind": "mamba2", **options}, "model.mixer")
        entry.cls(checked, CTX)
    assert "\n" not in str(error.value)
