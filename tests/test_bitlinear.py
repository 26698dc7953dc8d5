"""BitLinear: ternary weights, integer activations, straight-through gradients, exact packing,
and the int8 inference kernel against its float reference."""

import pytest
import torch
import torch.nn.functional as F

from seedbed.config import ModelConfig, RunConfig
from seedbed.data import tokenizer_from_proto
from seedbed.errors import UserError
from seedbed.model import LM
from seedbed.bench.ternary import bench_ternary_matmul
from seedbed.hardware import cpu_has_fast_bf16
from seedbed.model.bitlinear import (INT8_MATMUL_ON_CPU, BitLinear, norm_backward, quantise_activations,
                                     quantised_values, reference_norm_backward, reference_quantised_values,
                                     root_mean_square, ternarise, ternary_matmul_int8, ternary_matmul_reference,
                                     use_kernel)
from seedbed.model.packed_ternary import load_kernel, pack_trits, packed_ternary_linear, padded_width, unpack_trits
from seedbed.model.layers import DenseLinear
from seedbed.pack.artifact import QuantRule, read_artifact
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.registry import LINEARS
from seedbed.loaded import LoadedModel


def make_layer(in_features=48, out_features=40, seed=0, **options) -> BitLinear:
    torch.manual_seed(seed)
    entry, opts = LINEARS.options({"kind": "bitlinear", **options}, "test")
    return entry.cls(in_features, out_features, opts)


def brief_reference(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The BitNet b1.58 forward written out from the paper's formulas, independently of the module."""
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    w = layer.weight.detach()
    scale = w.abs().mean()
    w_q = torch.clamp(torch.round(w / scale), -1, 1) * scale
    absmax = x.abs().amax(-1, keepdim=True)
    x_q = torch.clamp(torch.round(x * 127 / absmax), -128, 127) * absmax / 127
    return x_q @ w_q.T


def test_weights_are_exactly_ternary_with_the_absmean_scale():
    w = make_layer().weight.detach()
    trits, scale = ternarise(w)
    assert scale == w.abs().mean()
    assert set((trits * scale).unique().tolist()) == {-scale.item(), 0.0, scale.item()}
    assert torch.equal(trits, torch.clamp(torch.round(w / w.abs().mean()), -1, 1))


def test_quantiser_is_idempotent_on_ternary_grids():
    w = make_layer().weight.detach()
    trits, scale = ternarise(w)
    again_trits, again_scale = ternarise(trits * scale)
    assert torch.equal(again_trits, trits) and again_scale == scale
    # Plain absmean would have shrunk the grid by its fraction of nonzeros.
    assert (trits * scale).abs().mean() < 0.9 * scale
    zero_trits, _ = ternarise(torch.zeros(4, 5))
    assert torch.equal(zero_trits, torch.zeros(4, 5))


def test_forward_matches_the_bitnet_formulas():
    layer = make_layer()
    x = torch.randn(3, 7, 48)
    torch.testing.assert_close(layer(x), brief_reference(layer, x), rtol=1e-5, atol=1e-6)
    # Quantising x and dividing the step by rms(x) is quantising the normed x.
    levels, step = layer.quantised_input(x)
    normed_levels, normed_step = quantise_activations(F.rms_norm(x, (48,), None, 1e-6), 8)
    assert torch.equal(levels, normed_levels)
    torch.testing.assert_close(step, normed_step, rtol=1e-6, atol=0)


def test_activations_take_at_most_256_levels_per_token():
    x = torch.randn(5, 4096) * torch.linspace(0.1, 10, 5)[:, None]
    levels, step = quantise_activations(x, 8)
    assert torch.equal(levels, levels.round()) and levels.min() >= -128 and levels.max() <= 127
    for row in levels:
        assert 150 < row.unique().numel() <= 255  # symmetric: -127..127; 4096 normals fill most of it
    assert ((levels * step - x).abs() <= step / 2 * (1 + 1e-5)).all()
    four_bit, _ = quantise_activations(x, 4)
    assert max(row.unique().numel() for row in four_bit) <= 15


def test_straight_through_gradients_are_those_of_the_quantised_linear():
    layer = make_layer(norm=False).train()
    x = torch.randn(6, 48, requires_grad=True)
    grad_out = torch.randn(6, 40)
    (layer(x) * grad_out).sum().backward()
    # The same forward from leaves holding the quantised values: its gradients are what the STE passes on.
    trits, scale = ternarise(layer.weight.detach())
    levels, step = quantise_activations(x.detach(), 8)
    w_q = (trits * scale).requires_grad_()
    x_q = (levels * step).requires_grad_()
    (F.linear(x_q, w_q) * grad_out).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_q.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ x_q.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_q.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("bits", [8, 4, 0])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_straight_through_equals_the_autograd_reference(norm, bits, autocast):
    """The training forward saves only x and W; outputs and gradients are the reference's."""
    layer = make_layer(norm=norm, activation_bits=bits).train()
    x = (3 * torch.randn(2, 5, 48)).requires_grad_()
    grad_out = torch.randn(2, 5, 40)
    results = []
    for forward in (layer.straight_through, layer.straight_through_reference):
        x.grad, layer.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        (y.float() * grad_out).sum().backward()
        results.append((y, x.grad, layer.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    assert y.dtype == y_ref.dtype
    if norm and bits and load_kernel() is not None:  # the compiled quantiser sums the rms in its own order
        torch.testing.assert_close(y, y_ref, rtol=1e-2 if autocast else 1e-6, atol=1e-6)
    else:
        assert torch.equal(y, y_ref)
    tolerance = 1e-2 if autocast else 1e-5  # bf16 gradients round at 8 bits, in either order of operations
    torch.testing.assert_close(dx, dx_ref, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dw, dw_ref, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(load_kernel() is None, reason="the compiled kernel needs AVX2 and a C compiler")
@pytest.mark.parametrize("shape", [(3, 77), (1, 5), (0, 16), (517, 768), (2, 300, 129)])  # 517 rows: split over threads
def test_compiled_training_quantiser_and_norm_backward_equal_their_references(shape):
    """The same levels; with the norm the rms is summed in the kernel's order (an ulp or two)."""
    x = 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    grad = torch.randn(*shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # the kernel splits rows over torch's threads: uneven ranges, whatever this machine has
    try:
        for bits in (8, 4):
            assert torch.equal(quantised_values(x, False, bits), reference_quantised_values(x, False, bits))
            torch.testing.assert_close(quantised_values(x, True, bits), reference_quantised_values(x, True, bits),
                                       rtol=5e-7, atol=0)
        torch.testing.assert_close(norm_backward(x, grad.clone()), reference_norm_backward(x, grad),
                                   rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
    # Against the norm's own autograd, so the reference is checked too.
    leaf = x.clone().requires_grad_()
    (F.rms_norm(leaf, (shape[-1],), None, 1e-6) * grad).sum().backward()
    torch.testing.assert_close(reference_norm_backward(x, grad), leaf.grad, rtol=1e-5, atol=1e-6)


def test_zero_init_gives_zero_outputs_and_live_gradients():
    entry, opts = LINEARS.options({"kind": "bitlinear"}, "test")
    layer = entry.cls(16, 8, opts, zero_init=True)
    x = torch.randn(4, 16)
    y = layer(x)
    assert torch.equal(y, torch.zeros(4, 8))
    y.sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), torch.zeros(4, 8))


@pytest.mark.skipif(not INT8_MATMUL_ON_CPU, reason="torch._int_mm does not run on this CPU")
@pytest.mark.parametrize("shape", [(1, 48), (2, 9, 48), (33, 48), (1, 0, 48)])  # empty: an idle MoE expert
def test_int8_kernel_equals_float_reference_exactly(shape):
    layer = make_layer().eval()
    x = torch.randn(*shape)
    trits, scale = ternarise(layer.weight.detach())
    levels, step = layer.quantised_input(x)
    reference = ternary_matmul_reference(levels, step, trits, scale)
    assert torch.equal(ternary_matmul_int8(levels, step, trits.to(torch.int8), scale), reference)
    layer.pinned_kernel = "int8"
    with torch.no_grad():
        assert torch.equal(layer(x), reference)
    # The training path sums the same products in another order.
    torch.testing.assert_close(layer.train()(x), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_features", [1, 77, 128, 129, 300])  # odd widths: rows padded to 128 weights
def test_trits_pack_to_two_bits_and_unpack_unchanged(in_features):
    trits = torch.randint(-1, 2, (13, in_features), generator=torch.Generator().manual_seed(in_features))
    codes = pack_trits(trits)
    assert codes.dtype == torch.uint8 and codes.shape == (13, padded_width(in_features) // 4)
    assert torch.equal(unpack_trits(codes, in_features), trits.to(torch.int8))
    # The layout: byte j of a block holds weights j, j+32, j+64, j+96, lowest bits first.
    row = torch.zeros(1, 128, dtype=torch.int64)
    row[0, [5, 37, 69, 101]] = torch.tensor([1, -1, 0, 1])
    assert pack_trits(row)[0, 5] == 2 | 0 << 2 | 1 << 4 | 2 << 6


@pytest.mark.skipif(load_kernel() is None, reason="the packed kernel needs AVX2 and a C compiler")
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(1, 256, 1024), (3, 77, 13), (5, 300, 129), (17, 1536, 32), (0, 48, 40)])
def test_packed_kernel_equals_float_reference(shape, norm):
    """Levels and int32 sums bit for bit: without the norm the outputs are equal; with it the kernel's
    rms is summed in another order, which may move the scale by an ulp, never a sum by one."""
    tokens, in_features, out_features = shape
    generator = torch.Generator().manual_seed(sum(shape))
    trits, scale = ternarise(torch.randn(out_features, in_features, generator=generator))
    x = 3 * torch.randn(tokens, in_features, generator=generator)
    levels, step = quantise_activations(x, 8)
    if norm:
        step = step / root_mean_square(x)
    reference = ternary_matmul_reference(levels, step, trits, scale)
    packed = packed_ternary_linear(x, pack_trits(trits), in_features, float(scale), 8, norm)
    if norm:  # one integer off would be >= 1/|sum| >= 5e-6 relative here (|sum| <= 127 * 1536); an ulp is 6e-8
        torch.testing.assert_close(packed, reference, rtol=5e-7, atol=0)
    else:
        assert torch.equal(packed, reference)


@pytest.mark.skipif(load_kernel() is None, reason="the packed kernel needs AVX2 and a C compiler")
def test_eval_bitlinear_runs_the_packed_kernel_on_two_bit_codes():
    layer = make_layer(in_features=200, out_features=24).eval()
    x = torch.randn(2, 7, 200)
    with torch.no_grad():
        y = layer(x)
    codes, scale = layer.packed()
    assert layer.kernel == "packed" and codes.dtype == torch.uint8 and codes.numel() == 24 * 256 // 4
    levels, step = layer.quantised_input(x)
    reference = ternary_matmul_reference(levels, step, *ternarise(layer.weight.detach()))
    torch.testing.assert_close(y, reference, rtol=5e-7, atol=0)
    use_kernel(layer, "float")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=5e-7, atol=0)
    assert layer.kernel == "float"


def test_float_activations_option():
    layer = make_layer(activation_bits=0)
    x = torch.randn(5, 48)
    train_out = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), train_out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(make_layer(activation_bits=8)(x), train_out)
    with pytest.raises(UserError, match="activation_bits must be 0"):
        make_layer(activation_bits=9)


def test_inference_cache_follows_weight_changes():
    layer = make_layer().eval()
    x = torch.randn(3, 48)
    with torch.no_grad():
        before = layer(x)
        assert layer.packed()[0] is layer.packed()[0]  # unchanged weight: no rebuild
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    (layer(x) ** 2).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, brief_reference(layer, x), rtol=1e-5, atol=1e-6)
        other = make_layer(seed=1)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other.eval()(x))


def bitlinear_model(tmp_path) -> LoadedModel:
    """A 2-layer bitlinear LM with an untied head, trained two steps so no weight sits at its init."""
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(vocab_size=256, d_model=32, n_layers=2, max_seq_len=32, tie_embeddings=False,
                                      mixer={"kind": "attention", "n_heads": 4}, linear={"kind": "bitlinear"}))
    model = LM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (4, 17))
    for _ in range(2):
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return LoadedModel(model, cfg, tokenizer_from_proto(None), tmp_path)


def bitlinear_names(model: LM) -> list[str]:
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, BitLinear)]


def test_head_stays_dense():
    model = bitlinear_model(None).model
    assert isinstance(model.head, DenseLinear)
    assert isinstance(model.blocks[0].mixer.q, BitLinear) and isinstance(model.blocks[1].ffn.down, BitLinear)


def test_pack_stores_ternary_and_load_reproduces_logits_exactly(tmp_path):
    loaded = bitlinear_model(tmp_path)
    model = loaded.model.train()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    train_logits = model(tokens)
    with torch.no_grad():
        eval_logits = model.eval()(tokens)
    # An explicit pattern still wins over the declared kind; the fp32 default does not.
    path = tmp_path / "bit.seedbed"
    pack_model(loaded, path, QuantRule.parse("fp32,blocks.1.mixer.q.weight=fp32"))
    entries = {e["name"]: e for e in read_artifact(path).manifest["tensors"]}
    names = bitlinear_names(model)
    assert entries["blocks.1.mixer.q.weight"]["kind"] == "fp32"
    assert entries["head.weight"]["kind"] == "fp32"
    for name in set(names) - {"blocks.1.mixer.q.weight"}:
        assert entries[name]["kind"] == "ternary"
        numel = model.get_parameter(name).numel()
        assert entries[name]["length"] == -(-numel // 5) + 4  # 1.6 bits per weight and one float32 scale

    restored = load_artifact(path).model
    for name in set(names) - {"blocks.1.mixer.q.weight"}:
        decoded = restored.get_parameter(name).detach()
        trits, scale = ternarise(model.get_parameter(name).detach())
        assert torch.equal(decoded, trits * scale)  # exactly ternary times the layer's own scale
    with torch.no_grad():
        assert torch.equal(restored(tokens), eval_logits)
    assert torch.equal(restored.train()(tokens), train_logits)


def test_repacking_a_loaded_artifact_keeps_its_weights(tmp_path):
    first = tmp_path / "first.seedbed"
    pack_model(bitlinear_model(tmp_path), first, QuantRule.parse("int8"))
    loaded = load_artifact(first)
    second = tmp_path / "second.seedbed"
    pack_model(loaded, second, QuantRule.parse("int8"))
    again = load_artifact(second)
    for name in bitlinear_names(loaded.model):
        trits, scale = ternarise(loaded.model.get_parameter(name).detach())
        trits_again, scale_again = ternarise(again.model.get_parameter(name).detach())
        assert torch.equal(trits_again, trits)
        torch.testing.assert_close(scale_again, scale, rtol=1e-6, atol=0)


def test_bench_reports_medians_for_every_candidate():
    (row,) = bench_ternary_matmul([(64, 96)], min_run_time=0.01)
    assert (row["in_features"], row["out_features"]) == (64, 96)
    expected = {"fp32_dense_us", "ternary_reference_us", "bitlinear_eval_us"}
    expected |= {"ternary_int8_us", "int8_layer_us"} if INT8_MATMUL_ON_CPU else set()
    expected |= {"packed_layer_us"} if load_kernel() is not None else set()
    expected |= {"bf16_dense_us"} if cpu_has_fast_bf16() else set()  # emulated bf16 is not timed
    assert expected == set(row) - {"in_features", "out_features", "threads", "weight_bytes"}
    assert row["weight_bytes"] == {"fp32": 4 * 64 * 96, "int8": 64 * 96, "packed": 128 * 96 // 4}
    assert all(row[key] > 0 for key in expected)
