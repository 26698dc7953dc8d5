"""KAN feed-forward: basis invariants, fast bases equal the references, the layer equals its edge sum."""

import math

import pytest
import torch
import torch.nn.functional as F

from seedbed.errors import UserError
from seedbed.model.kan import (KAN, KANLayer, bspline_bases, flops_per_token, hidden_width, mlp_matched_mult,
                               n_bases, rbf_bases, reference_bspline_bases, reference_rbf_bases)
from seedbed.model.layers import BuildContext
from seedbed.model.mlp import MLP
from seedbed.registry import FFNS

CTX = BuildContext(d_model=16, n_layers=1, layer_index=0, max_seq_len=32,
                   linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output matrices would hide bugs: give every weight a random value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def ffn(ctx: BuildContext = CTX, **options) -> KAN:
    torch.manual_seed(0)
    return perturbed(KAN(KAN.Options(**options), ctx))


@pytest.mark.parametrize("grid_size,order,grid_range", [(8, 3, (-2.0, 2.0)), (5, 2, (-1.0, 3.0)), (3, 1, (0.0, 1.0))])
def test_bspline_bases_partition_unity_nonnegative_and_local(grid_size, order, grid_range):
    low, high = grid_range
    x = torch.cat([torch.linspace(low, high, 997), torch.linspace(low, high, grid_size + 1)])  # knots included
    bases = bspline_bases(x, low, high, grid_size, order)
    assert bases.shape == (x.numel(), grid_size + order)
    torch.testing.assert_close(bases.sum(-1), torch.ones(x.numel()), rtol=0, atol=1e-5)
    assert bases.min() >= 0
    assert (bases > 0).sum(-1).max() <= order + 1
    # Beyond the extended grid every basis is exactly zero.
    spacing = (high - low) / grid_size
    outside = torch.tensor([low - order * spacing - 1e-3, high + order * spacing + 1e-3, 1e4, -1e4])
    assert torch.equal(bspline_bases(outside, low, high, grid_size, order), torch.zeros(4, grid_size + order))


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_vectorised_bspline_equals_scalar_reference(order):
    g = torch.Generator().manual_seed(order)
    x = torch.rand(6, 40, generator=g) * 7 - 3.5  # the grid [-1, 3], its extension and beyond
    if order > 0:  # knots exactly (an order-0 basis jumps there, so rounding would decide)
        x[0, :6] = torch.tensor([-1.0, 0.6, 1.4, 3.0, 2.2, -0.2])
    fast = bspline_bases(x, -1.0, 3.0, 5, order)
    torch.testing.assert_close(fast.double(), reference_bspline_bases(x, -1.0, 3.0, 5, order), rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bspline_backward_equals_the_reference_derivative(order):
    """The analytic backward against central differences of the scalar reference (float64)."""
    g = torch.Generator().manual_seed(10 + order)
    x = (torch.rand(200, generator=g, dtype=torch.float64) * 7 - 3.5).requires_grad_(True)
    weights = torch.randn(200, 5 + order, generator=g, dtype=torch.float64)
    (bspline_bases(x, -1.0, 3.0, 5, order) * weights).sum().backward()
    step = 1e-6
    slope = (reference_bspline_bases(x.detach() + step, -1.0, 3.0, 5, order)
             - reference_bspline_bases(x.detach() - step, -1.0, 3.0, 5, order)) / (2 * step)
    torch.testing.assert_close(x.grad, (slope * weights).sum(-1), rtol=1e-6, atol=1e-6)


def test_rbf_bases_shape_and_values_match_the_formula():
    x = torch.randn(3, 4, 7) * 2
    bases = rbf_bases(x, -2.0, 2.0, 5)
    assert bases.shape == (3, 4, 7, 5)
    centres, width = [-2.0, -1.0, 0.0, 1.0, 2.0], 1.0
    plain = torch.tensor([[math.exp(-((u - c) / width) ** 2) for c in centres] for u in x.flatten().tolist()])
    torch.testing.assert_close(bases, plain.view(3, 4, 7, 5), rtol=1e-5, atol=1e-6)


def test_fused_rbf_bases_equal_the_autograd_reference_with_gradients():
    x = (torch.randn(3, 5, 7) * 2).requires_grad_()
    grad = torch.randn(3, 5, 7, 6)
    fused = rbf_bases(x, -2.0, 2.0, 6)
    (fused * grad).sum().backward()
    fused_grad, x.grad = x.grad, None
    reference = reference_rbf_bases(x, -2.0, 2.0, 6)
    (reference * grad).sum().backward()
    assert torch.equal(fused, reference)
    torch.testing.assert_close(fused_grad, x.grad, rtol=1e-5, atol=1e-6)


def edge_sum_reference(layer: KANLayer, x: torch.Tensor) -> torch.Tensor:
    """y_o = sum_i w_base[o, i] silu(x_i) + sum_b w_spline[o, i, b] B_b(x_i), edge by edge."""
    x = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()
    w_base = layer.base.weight
    w_spline = layer.spline.weight.view(w_base.shape[0], w_base.shape[1], -1)
    out = torch.zeros(x.shape[0], w_base.shape[0])
    for row in range(x.shape[0]):
        for i in range(x.shape[1]):
            u = x[row, i]
            if layer.basis == "rbf":
                basis = rbf_bases(u[None], layer.grid_min, layer.grid_max, layer.grid_size)[0]
            else:
                basis = reference_bspline_bases(u[None], layer.grid_min, layer.grid_max, layer.grid_size,
                                                layer.spline_order)[0].float()
            out[row] += w_base[:, i] * F.silu(u) + w_spline[:, i] @ basis
    return out


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_layer_equals_the_sum_of_its_edge_functions(basis):
    torch.manual_seed(1)
    layer = perturbed(KANLayer(16, 5, KAN.Options(basis=basis, grid_range=[-1.5, 2.5]), CTX))
    x = torch.randn(4, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), edge_sum_reference(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"basis": "rbf"}, {"down": "linear"}])
def test_gradients_reach_both_weights_and_the_input(options):
    kan = ffn(**options)
    x = torch.randn(2, 9, 16, requires_grad=True)
    (kan(x, None) * torch.randn(2, 9, 16)).sum().backward()
    layers = [kan.up, kan.down] if options.get("down", "kan") == "kan" else [kan.up]
    grads = [x.grad] + [layer.base.weight.grad for layer in layers] + [layer.spline.weight.grad for layer in layers]
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_inputs_far_outside_the_grid_stay_finite(basis):
    kan = ffn(basis=basis)
    x = torch.randn(3, 16) * 1e-3
    x[:, 0] = torch.tensor([1e6, -1e15, 5.0])  # normalised to about +-4: beyond the extended grid [-3.5, 3.5]
    x.requires_grad_(True)
    out = kan(x, None)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    if basis == "bspline":  # the spline term is off there: only the SiLU term carries the feature
        bases = kan.up.bases(F.rms_norm(x.detach(), (16,), eps=1e-6))
        assert torch.equal(bases[:, 0], torch.zeros(3, n_bases(KAN.Options())))


@pytest.mark.parametrize("basis", ["bspline", "rbf"])
def test_bf16_autocast_forward_is_finite_and_close(basis):
    kan = ffn(basis=basis)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        full = kan(x, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = kan(x, None)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize("options", [{}, {"basis": "rbf"}, {"down": "linear"}, {"basis": "rbf", "down": "linear"}])
def test_matched_mult_gives_the_parameters_of_an_mlp_and_flops_count_them(options):
    ctx = BuildContext(96, 1, 0, 32, {"kind": "dense"}, {"kind": "rmsnorm"})
    mlp_params = sum(p.numel() for p in MLP(MLP.Options(mult=4.0), ctx).parameters())
    kan = KAN(KAN.Options(**options), ctx)  # mult 0: matched to an MLP of mult 4
    kan_params = sum(p.numel() for p in kan.parameters())
    assert abs(kan_params - mlp_params) <= 0.02 * mlp_params
    explicit = KAN.Options(**options, mult=mlp_matched_mult(KAN.Options(**options)))
    assert hidden_width(96, explicit) == hidden_width(96, KAN.Options(**options))
    # Every weight is one multiply-add per token; the elementwise estimate comes on top.
    flops = flops_per_token(96, KAN.Options(**options))
    assert 2 * kan_params < flops < 2.5 * kan_params


@pytest.mark.parametrize("spec,key", [
    ({"basis": "chebyshev"}, "basis"),
    ({"grid_range": [2.0, -2.0]}, "grid_range"),
    ({"grid_range": [-1.0, 0.0, 1.0]}, "grid_range"),
    ({"grid_range": 2.0}, "grid_range"),
    ({"basis": "rbf", "grid_size": 1}, "grid_size"),
    ({"spline_order": -1}, "spline_order"),
    ({"mult": -1.0}, "mult"),
    ({"down": "mlp"}, "down"),
    ({"grid": 8}, "grid"),
])
def test_bad_options_are_one_clear_user_error(spec, key):
    with pytest.raises(UserError, match=rf"model\.ffn\.{key}") as error:
        FFNS.options({"kind": "kan", **spec}, "model.ffn")
    assert "\n" not in str(error.value)
