"""BitLinear (BitNet b1.58): ternary weights, 8-bit activations, a float master weight.

Forward, for an input row x of width K and a master weight W of shape (N, K)::

    x̂ = x / rms(x)                                   parameter-free RMSNorm (option ``norm``)
    γ = mean |W|,   T = clamp(round(W / γ), -1, 1)    absmean ternary weights, W_q = γ T
    a = max |x̂|,    L = round(x̂ Q / a),   x_q = L a / Q,   Q = 2^(bits-1) - 1 (127 at 8 bits)
    y = x_q W_q^T = (L T^T) · (a / Q) · γ

|x̂| <= a, so L already lies in [-Q, Q] and the paper's clamp to [-Q-1, Q] never binds.
The absmax quantiser is scale-invariant: L is computed from x itself and the norm only
divides the step a / Q by rms(x), which saves a pass over x per token.

Training keeps W in float and passes gradients straight through both quantisers
(STE): w_q = γT + (W - sg(W)) and x_q = La/Q + (x̂ - sg(x̂)) carry exactly the quantised
values forward and the identity Jacobian backward, so dL/dW = grad^T x_q and
dL/dx̂ = grad W_q. A zero weight (zero_init) gives T = 0 and outputs exactly zero
while its gradient still flows; γ is floored at 1e-12, the floor the ``ternary``
storage kind uses, so both always pick the same trits.

Memory. Through autograd the STE would keep, per call, the normed input, its quantised copy and
the matmul's cast of it. ``TernaryStraightThrough`` saves only x and W and recomputes the rest in
backward (the quantisers are cheap beside the matmuls); ``straight_through_reference`` is the
autograd form, and a test holds the two equal.

The norm. Blocks already pre-norm their input, so for q/k/v and the MLP's up
projection this RMSNorm only undoes the block norm's gain; it matters for the output
projections (attention ``out``, MLP ``down``), whose inputs are un-normalised: there it
is BitNet's SubLN, keeping the per-token absmax quantiser's range steady. It has no
gain of its own (a per-input gain would only rescale W's columns) so that a packed
model stores nothing but trits for this layer. ``norm = false`` drops it.

Idempotence, and why packing is exact. The class attribute ``storage_kinds`` makes the
packer store these weights with the ``ternary`` storage kind (5 trits per byte, one
float32 scale) whatever their size. That kind encodes W as T and γ by ``ternarise``
itself, and decodes to the grid tensor D = γT. Plain absmean of D would give
mean |D| = pγ (p: the fraction of nonzero trits) and scale the layer down by p. So
``ternarise`` treats a tensor already on a ternary grid, all nonzero magnitudes equal,
as a fixed point: D maps to (T, γ) again, the loaded layer computes bit for bit what
the trained one did, re-packing a loaded artifact writes the same bytes, and the
quantiser is a projection. A trained float master is in practice never on such a grid
(an all-zero one is, and maps to zero either way). One consequence: training a loaded
artifact's weights starts from D, and the first optimiser step moves them off the grid,
where the scale becomes mean |W| ≈ pγ again; LoRA fine-tuning (below) leaves them on it.

LoRA (``lora_rank`` r > 0): y = BitLinear(x) + (x A^T) B, with A (r, in) Gaussian of
std 1/sqrt(in) and B (r, out) zero, so an adapted layer starts as the ternary one. ``seedbed
train --from ARTIFACT`` trains only A and B on a user's text (``train.trainable = "lora"``):
the trits and their scale stay exactly those of the artifact, and packing writes them as
the same bytes with the adapters beside them (declared int8: the default rule would keep
such small tensors in fp16).

Inference. With gradients off and the module in eval mode, the trits are cached in the
form the fastest kernel this machine runs wants, rebuilt when the weight's version counter
or storage changes (an optimiser step, ``load_state_dict``, ``.to``):

- ``packed`` (CPU with AVX2 and a C compiler): 2-bit codes, 0.25 bytes a weight, and one call
  of the compiled kernel in ``packed_ternary.py`` for the whole layer (norm, quantisation,
  integer products, rescale);
- ``int8`` (CPU, no compiler): int8 trits and ``torch._int_mm`` (int8 x int8 -> int32);
- ``float`` (GPUs, or ``activation_bits = 0``, where activations are not integers): float trits.

The float reference ``ternary_matmul_reference`` computes the same integers in float32,
exactly, since every partial sum is an integer below 2^24 while K < 2^17, so all three give
the same integer sums and can serve any batch size (the packed kernel sums the rms in its own
order, so its scale may differ in the last bit). Batch-1 timings, against fp32 and bf16
matmuls, are in ``seedbed bench mixkabrn`` (docs/BENCHMARKS.md). ``use_kernel`` pins one
kind for a whole model, to compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seedbed.model.layers import initial_weight
from seedbed.model import packed_ternary
from seedbed.model.packed_ternary import load_kernel, pack_trits, packed_ternary_linear
from seedbed.errors import UserError
from seedbed.perf import Flops, matmul_flops
from seedbed.registry import LINEARS, require

SCALE_FLOOR = 1e-12  # floor of the weight scale γ and of a token's absmax a; matches the ternary storage kind
NORM_EPS = 1e-6


def ternarise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantiser: (trits T in {-1, 0, 1} as floats, scale γ), W_q = γ T.

    A tensor already on a ternary grid (every nonzero |w| equal) is a fixed point: it
    returns its own signs and magnitude, so decoded artifacts quantise to themselves.
    """
    magnitude = weight.abs()
    top = magnitude.amax()
    if torch.all((magnitude == top) | (magnitude == 0)):
        return torch.sign(weight), top.clamp_min(SCALE_FLOOR)
    scale = magnitude.mean().clamp_min(SCALE_FLOOR)
    return torch.clamp(torch.round(weight / scale), -1, 1), scale


def quantise_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax: integer levels L in [-Q, Q] (as floats, at most 2^bits - 1 distinct) and step a / Q."""
    levels_max = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR)
    # |x| <= a, so the rounded levels already lie in [-Q, Q]: the paper's clamp would never bind.
    return torch.round(x * (levels_max / absmax)), absmax / levels_max


def root_mean_square(x: torch.Tensor) -> torch.Tensor:
    """The divisor of a parameter-free RMSNorm, per token."""
    return torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)


def ternary_matmul_reference(levels: torch.Tensor, step: torch.Tensor, trits: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """(L T^T) · step · γ with the integer products summed in float32 (exact while K < 2^17)."""
    return F.linear(levels, trits.float()) * (step * scale)


def ternary_matmul_int8(levels: torch.Tensor, step: torch.Tensor, trits_int8: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """The same as ``ternary_matmul_reference`` through an int8 x int8 -> int32 matmul."""
    rows = levels.reshape(-1, levels.shape[-1]).to(torch.int8)
    # The transposed view (column-major trits) is the layout the CPU kernel runs fastest on.
    sums = torch._int_mm(rows, trits_int8.t())
    return sums.reshape(*levels.shape[:-1], trits_int8.shape[0]) * (step * scale)  # int32 sums < 2^24: exact


def int8_matmul_works() -> bool:
    """Whether ``torch._int_mm`` exists and runs on the CPU in this torch build."""
    try:
        ones = torch.ones(1, 8, dtype=torch.int8)
        return int(torch._int_mm(ones, ones.t())) == 8
    except (AttributeError, RuntimeError):
        return False


INT8_MATMUL_ON_CPU = int8_matmul_works()


def reference_quantised_values(x: torch.Tensor, norm: bool, bits: int) -> torch.Tensor:
    """x_q in float32: L · step (the quantised normed input), or the normed input itself at ``bits = 0``."""
    x = x.float()
    if not bits:
        return F.rms_norm(x, (x.shape[-1],), None, NORM_EPS) if norm else x
    levels, step = quantise_activations(x, bits)
    return levels * (step / root_mean_square(x) if norm else step)


def quantised_values(x: torch.Tensor, norm: bool, bits: int) -> torch.Tensor:
    """``reference_quantised_values``, in one compiled call where the kernel runs (the same levels; the
    rms summed in the kernel's order)."""
    if bits and x.device.type == "cpu" and load_kernel() is not None:
        return packed_ternary.quantised_values(x.float(), bits=bits, norm=norm)
    return reference_quantised_values(x, norm, bits)


def reference_norm_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dx of the parameter-free RMSNorm x̂ = x / rms(x), given dL/dx̂ (float32)."""
    x = x.float()
    inverse_rms = torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS)
    normed = x * inverse_rms
    return (grad - normed * (grad * normed).mean(-1, keepdim=True)) * inverse_rms


def norm_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``reference_norm_backward``, in place on ``grad`` (float32, contiguous, this call's own) through the
    compiled kernel where it runs."""
    if x.device.type == "cpu" and load_kernel() is not None:
        return packed_ternary.norm_backward_(x.float(), grad)
    return reference_norm_backward(x, grad)


class TernaryStraightThrough(torch.autograd.Function):
    """y = x_q W_q^T, with the STE's gradients, saving only x and W (``BitLinear.straight_through_reference``
    is the same through autograd, which keeps the normed and the quantised input of every call alive)::

        dL/dx̂ = g W_q,   dL/dx = (dL/dx̂ - x̂ mean(dL/dx̂ · x̂)) / rms(x)   (the RMSNorm's Jacobian),
        dL/dW = g^T x_q                                                    (x_q recomputed from x)

    Matmuls run in ``dtype`` (the autocast dtype, or x's), the quantisers in float32, as in the reference.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, norm: bool, bits: int, dtype: torch.dtype) -> torch.Tensor:
        trits, scale = ternarise(weight.detach())
        ctx.save_for_backward(x, weight)
        ctx.norm, ctx.bits, ctx.dtype = norm, bits, dtype
        return F.linear(quantised_values(x, norm, bits).to(dtype), (trits * scale).to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        trits, scale = ternarise(weight.detach())
        grad = grad.to(ctx.dtype)
        grad_normed = (grad @ (trits * scale).to(ctx.dtype)).float().contiguous()
        if ctx.norm:
            grad_normed = norm_backward(x, grad_normed)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a frozen base (LoRA fine-tuning) needs no weight gradient
            rows = grad.reshape(-1, grad.shape[-1])
            inputs = quantised_values(x, ctx.norm, ctx.bits).to(ctx.dtype).reshape(-1, x.shape[-1])
            grad_weight = (rows.t() @ inputs).to(weight.dtype)
        return grad_normed.to(x.dtype), grad_weight, None, None, None


@LINEARS.register("bitlinear")
class BitLinear(nn.Module):
    """Ternary-weight linear with per-token absmax activation quantisation; see the module docstring."""

    storage_kinds = {"weight": "ternary"}  # what the artifact packer stores this module's tensors as

    @dataclass
    class Options:
        init_std: float = 0.0  # 0: 1/sqrt(in_features), like the dense kind
        norm: bool = True  # parameter-free RMSNorm of the input before quantising (BitNet's SubLN)
        activation_bits: int = 8  # per-token absmax levels; 0 keeps activations in float
        lora_rank: int = 0  # > 0: a float low-rank adapter beside the ternary weight (fine-tuning)

        def check(self, where: str) -> None:
            require(self.init_std >= 0, f"{where}.init_std must be >= 0, got {self.init_std}")
            require(self.activation_bits == 0 or 2 <= self.activation_bits <= 8,
                    f"{where}.activation_bits must be 0 (off) or 2..8, got {self.activation_bits}")
            require(self.lora_rank >= 0, f"{where}.lora_rank must be >= 0, got {self.lora_rank}")

    def __init__(self, in_features: int, out_features: int, options: Options, zero_init: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm, self.activation_bits = options.norm, options.activation_bits
        self.weight = initial_weight(in_features, out_features, options.init_std, zero_init)
        if options.lora_rank:
            self.lora_down = nn.Parameter(torch.randn(options.lora_rank, in_features) / in_features ** 0.5)
            # Stored (r, out), not (out, r): the artifact's int8 rule keeps one scale per row, and a row
            # of r values would spend a 2-byte scale on every r bytes.
            self.lora_up = nn.Parameter(torch.zeros(options.lora_rank, out_features))
            # Each adapter is small, and the default rule would keep small tensors in fp16.
            self.storage_kinds = {**self.storage_kinds, "lora_down": "int8", "lora_up": "int8"}
        self.lora_rank = options.lora_rank
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kernel = "float"  # set with the cache: packed | int8 (CPU weights, integer activations) | float
        self.pinned_kernel: str | None = None  # use_kernel: this kind whatever the machine offers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.straight_through(x) if self.training or torch.is_grad_enabled() else self.inference(x)
        if self.lora_rank:
            y = y + F.linear(x, self.lora_down.to(x.dtype)) @ self.lora_up.to(x.dtype)
        return y

    def quantised_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels and step of the (normed) float32 input. The absmax quantiser is scale-invariant,
        so normalising only divides the step by rms(x): one pass over x saved at inference."""
        levels, step = quantise_activations(x, self.activation_bits)
        return levels, (step / root_mean_square(x) if self.norm else step)

    def straight_through(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised values forward, identity Jacobians backward (the BitNet STE), saving only x and W."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return TernaryStraightThrough.apply(x, self.weight, self.norm, self.activation_bits, dtype)

    def straight_through_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The STE through autograd: ``straight_through`` computes the same, keeping less alive."""
        trits, scale = ternarise(self.weight.detach())
        weight = trits * scale + (self.weight - self.weight.detach())
        normed = F.rms_norm(x, (x.shape[-1],), None, NORM_EPS) if self.norm else x
        if self.activation_bits:
            levels, step = self.quantised_input(x.detach().float())
            through = normed.float()
            normed = (levels * step + (through - through.detach())).to(x.dtype)
        return F.linear(normed, weight.to(normed.dtype))

    def flops(self, tokens: int) -> Flops:
        """x_q W_q^T: 2 * tokens * in * out forward, both gradients in backward (the STE passes them to
        x and W), and the same for a LoRA adapter's two matmuls; the norm and both quantisers are
        elementwise and not counted."""
        flops = matmul_flops(tokens, self.in_features, self.out_features)
        if self.lora_rank:
            flops = (flops + matmul_flops(tokens, self.in_features, self.lora_rank)
                     + matmul_flops(tokens, self.lora_rank, self.out_features))
        return flops

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (trits, γ), rebuilt when the weight changes: 2-bit codes for the packed kernel, int8
        trits for the int8 one, else float trits (``kernel`` says which)."""
        weight = self.weight
        key = (weight._version, weight.data_ptr(), weight.device, self.pinned_kernel)
        if key != self._cache_key or self._cache is None:
            integer = bool(self.activation_bits) and weight.device.type == "cpu"
            self.kernel = self.pinned_kernel or (available_kernels()[0] if integer else "float")
            with torch.no_grad():
                trits, scale = ternarise(weight.float())
                stored = {"packed": lambda: pack_trits(trits), "int8": lambda: trits.to(torch.int8),
                          "float": lambda: trits}[self.kernel]()
                self._cache = stored, scale
            self._cache_key = key
        return self._cache

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        trits, scale = self.packed()
        if self.kernel == "packed":
            return packed_ternary_linear(x, trits, self.in_features, float(scale), self.activation_bits,
                                         self.norm).to(x.dtype)
        if not self.activation_bits:
            normed = F.rms_norm(x, (x.shape[-1],), None, NORM_EPS) if self.norm else x
            return F.linear(normed.float(), trits * scale).to(x.dtype)
        levels, step = self.quantised_input(x.float())
        matmul = ternary_matmul_int8 if self.kernel == "int8" else ternary_matmul_reference
        return matmul(levels, step, trits, scale).to(x.dtype)


def available_kernels() -> list[str]:
    """The kinds of BitLinear inference this machine runs, fastest first (``packed`` needs AVX2 and a
    C compiler, ``int8`` a torch whose ``_int_mm`` runs on the CPU)."""
    return [kernel for kernel, runs in (("packed", load_kernel() is not None), ("int8", INT8_MATMUL_ON_CPU),
                                        ("float", True)) if runs]


def use_kernel(model: nn.Module, kernel: str | None) -> None:
    """Run every BitLinear of ``model`` on ``kernel`` (one of ``available_kernels()``; None: the fastest)."""
    if kernel is not None and kernel not in available_kernels():
        raise UserError(f"the {kernel} ternary kernel does not run here (available: {', '.join(available_kernels())})")
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.pinned_kernel = kernel
