"""Kolmogorov–Arnold feed-forward (KAN), in the efficient form of efficient-KAN / FastKAN.

A KAN layer puts a learnable univariate function on every edge instead of a fixed
activation on every unit::

    y_o = sum_i phi_{o,i}(x_i),    phi_{o,i}(u) = w^base_{o,i} silu(u) + sum_b w^spline_{o,i,b} B_b(u)

where B_1 .. B_n are fixed basis functions on a grid over ``grid_range``. Expanding every
input into its n basis values and flattening them feature-major (input i's n values are
adjacent) into B(x) in R^{d_in n} turns the whole layer into two matmuls::

    y = W_base silu(x) + W_spline B(x),     W_base: (d_out, d_in),  W_spline: (d_out, d_in n)

Both matrices are built by ``ctx.linear``, so a config can make them ternary, seeded, ...

Bases
-----
``bspline`` (default): B-splines of order k (``spline_order``; degree k, cubic at 3) on a
uniform grid of G = ``grid_size`` intervals of width h = (max - min) / G, extended by k
knots on each side: t_j = min + (j - k) h for j = 0 .. G + 2k. Cox–de Boor::

    B_{j,0}(u) = 1 if t_j <= u < t_{j+1} else 0
    B_{j,p}(u) = (u - t_j) / (p h) B_{j,p-1}(u) + (t_{j+p+1} - u) / (p h) B_{j+1,p-1}(u)

leaves n = G + k bases. On [min, max] they are nonnegative, sum to 1, and at most k + 1
are nonzero at any u; outside the extended grid all are 0. ``bspline_bases`` runs the
recursion on all features at once (the loop is over p only) in knot units
v = (u - min) / h + k, where t_j is the integer j. With s_j = v - j, so that
t_{j+p+1} - v = p - s_{j+1}, the step needs one product per basis::

    B_{j,p} = B_{j+1,p-1} + (s_j B_{j,p-1} - s_{j+1} B_{j+1,p-1}) / p

Its backward is the derivative of a B-spline, dB_{j,k}/dv = B_{j,k-1} - B_{j+1,k-1}, from
the saved order k - 1 bases, rather than autograd through every step: fewer and smaller
tensors on the (tokens, d, n) scale, where this layer's time goes. ``reference_bspline_bases``
evaluates the textbook recursion scalar by scalar on the knot values.

``rbf`` (FastKAN): n = G Gaussians exp(-((u - c_i) / h)^2), centres c_i evenly spaced from
min to max, h = (max - min) / (G - 1).

Input range
-----------
Each KAN layer RMS-normalises its input, without a gain (the weights before it already
set each feature's scale), so its features sit on the grid: at unit RMS most values of a
feature fall inside the default [-2, 2]. After the norm |u| <= sqrt(d_in), so nothing
overflows, and an input beyond the grid only loses its spline term (every basis is 0, or
a vanishing Gaussian): the SiLU term carries it, and outputs and gradients stay finite.

The feed-forward
----------------
``down = "kan"`` (default) stacks two KAN layers, d -> H -> d; ``down = "linear"`` keeps
the KAN up-layer and projects back with one plain matrix. The last layer's matrices start
at zero, like every output projection. The hidden width is H = round(mult d). A KAN edge
holds 1 + n weights, so at equal width a KAN is far larger than an MLP; with
c = (1 + n) + (1 + n if down is kan, else 1) the KAN has d H c matrix weights against
2 m d^2 for an MLP of mult m, so ``mlp_matched_mult`` returns mult = 2 m / c (whatever d),
and ``mult = 0`` (default) uses the match for m = 4. At defaults (n = 11) that is H = d / 3.

Memory. In training the spline term is recomputed in backward (activation checkpointing): the
(tokens, d_in n) bases and the spline linear's quantised input are never kept for backward, only
x'; what it costs is one more basis pass per step, and at mixkabrn's shape it is no slower overall,
since fewer large blocks pass through the allocator.

``flops_per_token`` counts the forward pass: 2 FLOPs per multiply-add of every matmul,
plus the elementwise work (norm, SiLU, bases), one FLOP per elementary op, exp included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seedbed.model.layers import BuildContext
from seedbed.perf import Flops
from seedbed.registry import FFNS, require

BASES = ("bspline", "rbf")
DOWNS = ("kan", "linear")
MLP_MULT_MATCHED_BY_DEFAULT = 4.0
NORM_EPS = 1e-6
# Elementwise FLOPs per input feature for the estimate in ``flops_per_token``.
NORM_FLOPS = 3  # square, sum, scale
SILU_FLOPS = 4  # exp, add, divide, multiply
RBF_FLOPS_PER_BASIS = 4  # subtract, divide, square, exp
BSPLINE_FLOPS_PER_INTERVAL = 2  # the offset s_j and the order-0 indicator
BSPLINE_FLOPS_PER_BASIS_AND_ORDER = 4  # a product, a difference, a division, a sum


class UniformBSplines(torch.autograd.Function):
    """Cox–de Boor in knot units, with the B-spline derivative as its backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, n_intervals: int, order: int) -> torch.Tensor:
        j = torch.arange(n_intervals, device=v.device, dtype=v.dtype)
        v = v.unsqueeze(-1)
        offsets = v - j  # s_j
        bases = (v.floor() == j).to(v.dtype)  # t_j <= v < t_{j+1}
        lower = bases
        for p in range(1, order + 1):
            lower = bases
            weighted = offsets[..., :lower.shape[-1]] * lower
            bases = (weighted[..., :-1] - weighted[..., 1:]).div_(p).add_(lower[..., 1:])
        ctx.save_for_backward(lower)
        ctx.order = order
        return bases

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.order == 0:  # piecewise constant: zero derivative almost everywhere
            return None, None, None
        (lower,) = ctx.saved_tensors
        return (grad * (lower[..., :-1] - lower[..., 1:])).sum(-1), None, None


def bspline_bases(x: torch.Tensor, grid_min: float, grid_max: float, grid_size: int, order: int) -> torch.Tensor:
    """(..., d) -> (..., d, grid_size + order), at least float32: every feature at once."""
    knot_spacing = (grid_max - grid_min) / grid_size
    v = (x.to(torch.promote_types(x.dtype, torch.float32)) - grid_min) / knot_spacing + order
    return UniformBSplines.apply(v, grid_size + 2 * order, order)


def reference_bspline_bases(x: torch.Tensor, grid_min: float, grid_max: float, grid_size: int,
                            order: int) -> torch.Tensor:
    """Plain reference for ``bspline_bases``: the recursion on the knot values, one scalar at a time."""
    spacing = (grid_max - grid_min) / grid_size
    knots = [grid_min + (j - order) * spacing for j in range(grid_size + 2 * order + 1)]

    def basis(u: float, j: int, p: int) -> float:
        if p == 0:
            return 1.0 if knots[j] <= u < knots[j + 1] else 0.0
        return ((u - knots[j]) / (knots[j + p] - knots[j]) * basis(u, j, p - 1)
                + (knots[j + p + 1] - u) / (knots[j + p + 1] - knots[j + 1]) * basis(u, j + 1, p - 1))

    values = [[basis(u, j, order) for j in range(grid_size + order)] for u in x.flatten().tolist()]
    return torch.tensor(values, dtype=torch.float64).view(*x.shape, grid_size + order)


class GaussianBases(torch.autograd.Function):
    """B_i = exp(-z_i^2), z_i = (u - c_i) / h, in one allocation (the rest in place), saving only u;
    backward recomputes z and B: dB_i/du = -2 z_i B_i / h."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
        ctx.save_for_backward(x, centres)
        ctx.width = width
        return (x.unsqueeze(-1) - centres).div_(width).square_().neg_().exp_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, centres = ctx.saved_tensors
        z = (x.unsqueeze(-1) - centres).div_(ctx.width)
        bases = z.square().neg_().exp_()
        return z.mul_(bases).mul_(grad).sum(-1).mul_(-2 / ctx.width), None, None


def rbf_grid(x: torch.Tensor, grid_min: float, grid_max: float,
             grid_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x in at least float32, the Gaussians' centres (evenly from min to max) and their width."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    centres = torch.linspace(grid_min, grid_max, grid_size, device=x.device, dtype=x.dtype)
    return x, centres, (grid_max - grid_min) / (grid_size - 1)


def rbf_bases(x: torch.Tensor, grid_min: float, grid_max: float, grid_size: int) -> torch.Tensor:
    """(..., d) -> (..., d, grid_size), at least float32: Gaussians centred evenly over the grid."""
    return GaussianBases.apply(*rbf_grid(x, grid_min, grid_max, grid_size))


def reference_rbf_bases(x: torch.Tensor, grid_min: float, grid_max: float, grid_size: int) -> torch.Tensor:
    """``rbf_bases`` through autograd, one op at a time."""
    x, centres, width = rbf_grid(x, grid_min, grid_max, grid_size)
    return torch.exp(-((x.unsqueeze(-1) - centres) / width).square())


def n_bases(options: KAN.Options) -> int:
    """Basis values per input feature: G + k B-splines, or G Gaussians."""
    return options.grid_size if options.basis == "rbf" else options.grid_size + options.spline_order


class KANLayer(nn.Module):
    """y = W_base silu(x') + W_spline B(x'), with x' = x / rms(x): one matmul per term."""

    def __init__(self, d_in: int, d_out: int, options: KAN.Options, ctx: BuildContext, zero_init: bool = False):
        super().__init__()
        self.basis, self.grid_size, self.spline_order = options.basis, options.grid_size, options.spline_order
        self.grid_min, self.grid_max = options.grid_range
        self.base = ctx.linear(d_in, d_out, zero_init=zero_init)
        self.spline = ctx.linear(d_in * n_bases(options), d_out, zero_init=zero_init)

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_in, n_bases), computed in at least float32."""
        if self.basis == "rbf":
            return rbf_bases(x, self.grid_min, self.grid_max, self.grid_size)
        return bspline_bases(x, self.grid_min, self.grid_max, self.grid_size, self.spline_order)

    def spline_term(self, x: torch.Tensor) -> torch.Tensor:
        return self.spline(self.bases(x).to(x.dtype).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
        if torch.is_grad_enabled():
            spline = checkpoint(self.spline_term, x, use_reentrant=False)
        else:
            spline = self.spline_term(x)
        return self.base(F.silu(x)) + spline

    def flops(self, tokens: int) -> Flops:
        """Its two matmuls, d_in -> d_out and d_in n -> d_out: 2 * d_in * d_out * (1 + n) per token at dense
        linears; the norm, SiLU and bases are elementwise and not counted."""
        return self.base.flops(tokens) + self.spline.flops(tokens)


@FFNS.register("kan")
class KAN(nn.Module):
    @dataclass
    class Options:
        basis: str = "bspline"  # bspline | rbf
        grid_size: int = 8  # grid intervals (bspline) or Gaussian centres (rbf)
        spline_order: int = 3  # bspline only: 3 is cubic
        grid_range: list[float] = field(default_factory=lambda: [-2.0, 2.0])
        mult: float = 0.0  # hidden width = mult * d_model; 0: match the parameters of an MLP of mult 4
        down: str = "kan"  # kan: two KAN layers | linear: KAN up-layer, plain matrix down

        def check(self, where: str) -> None:
            require(self.basis in BASES, f"{where}.basis must be one of {', '.join(BASES)}, got {self.basis!r}")
            require(self.down in DOWNS, f"{where}.down must be one of {', '.join(DOWNS)}, got {self.down!r}")
            smallest = 2 if self.basis == "rbf" else 1
            require(self.grid_size >= smallest,
                    f"{where}.grid_size must be >= {smallest} for basis {self.basis}, got {self.grid_size}")
            require(self.spline_order >= 0, f"{where}.spline_order must be >= 0, got {self.spline_order}")
            require(len(self.grid_range) == 2 and self.grid_range[0] < self.grid_range[1],
                    f"{where}.grid_range must be [min, max] with min < max, got {self.grid_range}")
            require(self.mult >= 0, f"{where}.mult must be >= 0 (0: match an MLP), got {self.mult}")

    def __init__(self, options: Options, ctx: BuildContext):
        super().__init__()
        hidden = hidden_width(ctx.d_model, options)
        self.up = KANLayer(ctx.d_model, hidden, options, ctx)
        self.down = (KANLayer(hidden, ctx.d_model, options, ctx, zero_init=True) if options.down == "kan"
                     else ctx.linear(hidden, ctx.d_model, zero_init=True))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))

    def flops(self, batch: int, context: int) -> Flops:
        """Matmul work of both layers (the module-level ``flops_per_token`` adds the elementwise estimate)."""
        tokens = batch * context
        return self.up.flops(tokens) + self.down.flops(tokens)


def mlp_matched_mult(options: KAN.Options, mlp_mult: float = MLP_MULT_MATCHED_BY_DEFAULT) -> float:
    """The ``mult`` at which this KAN has as many matrix weights as an MLP of ``mlp_mult``: 2 m / c."""
    per_edge = 1 + n_bases(options)
    weights_per_hidden_and_input = per_edge + (per_edge if options.down == "kan" else 1)
    return 2 * mlp_mult / weights_per_hidden_and_input


def hidden_width(d_model: int, options: KAN.Options) -> int:
    mult = options.mult or mlp_matched_mult(options)
    return max(1, round(mult * d_model))


def basis_flops_per_feature(options: KAN.Options) -> int:
    """Elementwise FLOPs to expand one input feature into its bases (the fast path's ops)."""
    if options.basis == "rbf":
        return RBF_FLOPS_PER_BASIS * options.grid_size
    intervals = options.grid_size + 2 * options.spline_order
    to_knot_units = 4  # subtract, divide, add, floor
    return (to_knot_units + BSPLINE_FLOPS_PER_INTERVAL * intervals
            + sum(BSPLINE_FLOPS_PER_BASIS_AND_ORDER * (intervals - p) for p in range(1, options.spline_order + 1)))


def flops_per_token(d_model: int, options: KAN.Options) -> int:
    """Forward FLOPs per token: 2 per matmul multiply-add, plus norm, SiLU and basis work per input feature."""
    hidden = hidden_width(d_model, options)
    elementwise = NORM_FLOPS + SILU_FLOPS + basis_flops_per_feature(options)
    total = 2 * d_model * hidden * (1 + n_bases(options)) + d_model * elementwise
    if options.down == "kan":
        return total + 2 * hidden * d_model * (1 + n_bases(options)) + hidden * elementwise
    return total + 2 * hidden * d_model
