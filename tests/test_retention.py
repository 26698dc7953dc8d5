"""Multi-scale retention: the three forms agree, match plain loops, and decode in constant memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from seedbed.errors import UserError
from seedbed.model.attention import apply_rotary, rotary_tables
from seedbed.model.layers import BuildContext
from seedbed.model.retention import (Retention, chunkwise_retention, decay_exponents, parallel_retention,
                                     recurrent_retention)
from seedbed.registry import MIXERS
from test_model import decode_three_ways

CTX = BuildContext(d_model=32, n_layers=1, layer_index=0, max_seq_len=64,
                   linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})
FORMS = {
    "parallel": lambda q, k, v, log_decay, state, chunk: parallel_retention(q, k, v, log_decay, state),
    "recurrent": lambda q, k, v, log_decay, state, chunk: recurrent_retention(q, k, v, log_decay, state),
    "chunkwise": chunkwise_retention,
}


def layer(**options) -> Retention:
    """A retention mixer with every parameter perturbed (the output projection starts at zero)."""
    torch.manual_seed(0)
    mixer = Retention(Retention.Options(**options), CTX)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mixer


def log_decays(exponents) -> torch.Tensor:
    return torch.tensor([math.log1p(-2.0 ** -e) for e in exponents])


def core_inputs(length: int, heads: int = 4, key_dim: int = 8, value_dim: int = 6, seed: int = 0):
    """Random q, k, v and a non-zero carried-in state, so the state paths are exercised too."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, key_dim, generator=g) / key_dim ** 0.5
    k = torch.randn(2, heads, length, key_dim, generator=g)
    v = torch.randn(2, heads, length, value_dim, generator=g)
    state = torch.randn(2, heads, key_dim, value_dim, generator=g)
    return q, k, v, state


def naive_retention(q, k, v, exponents, state):
    """o_n = gamma^(n+1) q_n S_0 + sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m, and S_T, in float64."""
    q, k, v, state = q.double(), k.double(), v.double(), state.double()
    gamma = torch.tensor([1 - 2.0 ** -e for e in exponents], dtype=torch.float64)[None, :, None]
    length = q.shape[2]
    out = torch.zeros(q.shape[:3] + v.shape[-1:], dtype=torch.float64)
    for n in range(length):
        out[:, :, n] = gamma ** (n + 1) * (q[:, :, n, None, :] @ state)[:, :, 0]
        for m in range(n + 1):
            out[:, :, n] += gamma ** (n - m) * (q[:, :, n] * k[:, :, m]).sum(-1, keepdim=True) * v[:, :, m]
    final = gamma[..., None] ** length * state
    for m in range(length):
        final += gamma[..., None] ** (length - 1 - m) * k[:, :, m, :, None] * v[:, :, m, None, :]
    return out, final


def test_parallel_form_equals_naive_loop():
    exponents = decay_exponents(4)
    q, k, v, state = core_inputs(21)
    out, final = parallel_retention(q, k, v, log_decays(exponents), state)
    want_out, want_final = naive_retention(q, k, v, exponents, state)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,chunk", [(1, 4), (5, 16), (16, 16), (37, 16), (37, 1), (64, 7), (100, 64)])
def test_forms_agree_on_outputs_states_and_gradients(length, chunk):
    log_decay = log_decays(decay_exponents(4))
    inputs = core_inputs(length)
    g = torch.Generator().manual_seed(9)
    out_weight, state_weight = torch.randn(inputs[2].shape, generator=g), torch.randn(inputs[3].shape, generator=g)
    results = {}
    for name, form in FORMS.items():
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, final = form(*leaves[:3], log_decay, leaves[3], chunk)
        grads = torch.autograd.grad((out * out_weight).sum() + (final * state_weight).sum(), leaves)
        results[name] = (out, final, *grads)
    for name in ("recurrent", "chunkwise"):
        for got, want in zip(results[name], results["parallel"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_long_sequence_with_decay_near_one_matches_closed_form(form):
    """q = k = v = 1 gives o_n = (1 - gamma^(n+1)) / (1 - gamma), computed here in float64.

    1 - 2^-5 is the fastest default decay (gamma^-1500 would already be e^48, the shortcut
    q gamma^n, k gamma^-n loses everything), 1 - 2^-12 the slowest, 1 - 2^-16 slower still.
    """
    exponents, length = [5, 12, 16], 1500
    ones = torch.ones(1, 3, length, 1)
    out, final = FORMS[form](ones, ones, ones, log_decays(exponents), torch.zeros(1, 3, 1, 1), 64)
    gamma = torch.tensor([1 - 2.0 ** -e for e in exponents], dtype=torch.float64)[:, None]
    n = torch.arange(length, dtype=torch.float64)
    want = (1 - gamma ** (n + 1)) / (1 - gamma)
    torch.testing.assert_close(out[0, :, :, 0].double(), want, rtol=2e-5, atol=0)
    torch.testing.assert_close(final[0, :, 0, 0].double(), want[:, -1], rtol=2e-5, atol=0)


def layer_reference(mixer: Retention, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equation, one output position and one earlier position at a time."""
    b, t, _ = x.shape
    heads, dk, dv = mixer.n_heads, mixer.key_dim, mixer.value_dim
    gamma = torch.tensor([1 - 2.0 ** -e for e in decay_exponents(heads)])[None, :, None]
    q = (x @ mixer.q.weight.T).view(b, t, heads, dk)
    k = (x @ mixer.k.weight.T).view(b, t, heads, dk)
    v = (x @ mixer.v.weight.T).view(b, t, heads, dv)
    outputs = []
    for n in range(t):
        q_n = apply_rotary(q[:, n], *rotary_tables(torch.tensor([n]), dk, 10000.0)) / math.sqrt(dk)
        o = torch.zeros(b, heads, dv)
        for m in range(n + 1):
            k_m = apply_rotary(k[:, m], *rotary_tables(torch.tensor([m]), dk, 10000.0))
            o += gamma ** (n - m) * (q_n * k_m).sum(-1, keepdim=True) * v[:, m]
        normed = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-6) * mixer.group_norm.weight
        gated = normed.reshape(b, heads * dv) * F.silu(x[:, n] @ mixer.gate.weight.T)
        outputs.append(gated @ mixer.out.weight.T)
    return torch.stack(outputs, dim=1)


def test_layer_equals_per_position_reference():
    mixer = layer(form="parallel", value_factor=1.5)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), layer_reference(mixer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,chunk", [(1, 8), (6, 8), (40, 8), (43, 8), (43, 64)])
def test_layer_forms_agree_on_outputs_and_gradients(length, chunk):
    x = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(5))
    results = {}
    for form in ("parallel", "recurrent", "chunkwise"):
        mixer = layer(form=form, chunk_size=chunk)
        leaf = x.clone().requires_grad_()
        y = mixer(leaf)
        (y * weight).sum().backward()
        results[form] = [y, leaf.grad] + [p.grad for p in mixer.parameters()]
    # Absolute tolerance grows with each tensor's scale: where a head's output at a position is
    # nearly zero (q . k cancels), the group norm divides by it, and the forms' summation orders
    # (q (k^T v) against (q . k) v) show up in the input gradient at about 1e-4 of its scale.
    for form in ("recurrent", "chunkwise"):
        for got, want in zip(results[form], results["parallel"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_paper_row_normalisation_is_removed_by_group_norm():
    """RetNet's D-row scaling and |row sum| division are per (position, head) scalars: no-ops here."""
    mixer = layer()
    q, k, v, _ = core_inputs(30, key_dim=8, value_dim=8)
    log_decay = log_decays(decay_exponents(4))
    plain, _ = parallel_retention(q, k, v, log_decay, torch.zeros(2, 4, 8, 8))
    position = torch.arange(30)
    distance = position[:, None] - position[None, :]
    decay = (distance * log_decay[:, None, None]).masked_fill(distance < 0, float("-inf")).exp()
    decay = decay / decay.sum(-1, keepdim=True).sqrt()
    scores = (q @ k.transpose(-1, -2)) * decay
    paper = (scores / scores.sum(-1, keepdim=True).abs().clamp(min=1)) @ v
    with torch.no_grad():
        torch.testing.assert_close(mixer.group_norm(paper.transpose(1, 2)), mixer.group_norm(plain.transpose(1, 2)),
                                   rtol=1e-3, atol=1e-3)


def test_chunked_prefill_state_equals_one_at_a_time_steps():
    # Two prefills (the second continues from a non-zero state across several chunks), then single steps.
    full, singles, parts, single, chunked = decode_three_ways(layer(chunk_size=8), torch.randn(2, 45, 32), [11, 40])
    assert single["pos"] == chunked["pos"] == 45
    torch.testing.assert_close(chunked["state"], single["state"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(singles, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts, full, rtol=1e-4, atol=1e-4)


def test_state_size_does_not_grow_with_steps_or_max_len():
    mixer = layer(value_factor=2.0)
    x = torch.randn(1, 70, 32)
    state = mixer.init_state(1, 4, x.device, x.dtype)  # max_len 4: only a hint, decoding goes past it
    assert mixer.init_state(1, 100_000, x.device, x.dtype)["state"].shape == state["state"].shape
    with torch.no_grad():
        for t in range(70):
            mixer.step(x[:, t:t + 1], state)
            assert set(state) == {"state", "pos"}
            assert state["state"].shape == (1, 4, 8, 16)
    assert state["pos"] == 70


def test_bf16_autocast_is_close_to_float32_and_keeps_a_float32_state():
    mixer = layer()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        want = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mixer(x)
            state = mixer.init_state(2, 50, x.device, torch.bfloat16)
            mixer.step(x[:, :30], state)
            mixer.step(x[:, 30:31], state)
    assert got.dtype == torch.bfloat16
    assert state["state"].dtype == torch.float32
    assert (got.float() - want).norm() / want.norm() < 0.03


def test_decays_follow_the_multiscale_rule_and_output_starts_at_zero():
    assert decay_exponents(4) == [5, 6, 7, 8]
    assert decay_exponents(8) == [5, 6, 7, 8, 9, 10, 11, 12]
    spread = decay_exponents(12)
    assert spread[0] == 5 and spread[-1] == 12 and all(a < b for a, b in zip(spread, spread[1:]))
    torch.manual_seed(0)
    mixer = Retention(Retention.Options(n_heads=2), CTX)
    assert mixer.log_decays == [math.log(1 - 2.0 ** -5), math.log(1 - 2.0 ** -6)]
    assert mixer.out.weight.abs().max() == 0


@pytest.mark.parametrize("options,message", [
    ({"form": "quadratic"}, "form must be one of chunkwise, parallel, recurrent"),
    ({"chunk_size": 0}, "chunk_size must be positive"),
    ({"gate": "relu"}, "gate must be one of swish, gelu"),
    ({"n_heads": 3}, "n_heads=3 does not divide model.d_model=32"),
    ({"n_heads": 32}, "head size 1 must be even"),
    ({"value_factor": 0.3}, "value_factor=0.3 times head size 8 is not a whole number"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(UserError, match=message):
        entry, checked = MIXERS.options({"kind": "retention", **options}, "model.mixer")
        entry.cls(checked, CTX)
