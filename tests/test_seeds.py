"""The counter-based PRNG and the linears grown from seeds."""

import numpy as np
import pytest
import torch

from seedbed.config import ModelConfig, RunConfig
from seedbed.model import LM, count_parameters, virtual_parameters
from seedbed.model.seeded import OrthogonalLoRALinear, SeededLinear
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.data import ByteTokenizer
from seedbed.loaded import LoadedModel
from seedbed.seeds import (CPU_BLOCK, lowbias32, mul32, random_bits, random_int8, random_mask, random_normal, random_uniform,
                           seed_from_name)

# Golden values: a change here changes every seeded model ever packed.
GOLDEN = {
    (0, 0): [33350994, 2972792678, 3986544873, 3457416572],
    (-1, 0): [1849944626, 1955311241, 2302796888, 733867973],
    (2**62 + 12345, 2**33): [2729693580, 1430306282, 542216620],
}


def reference_lowbias32(x: int) -> int:
    """The hash on Python integers, as published: the plain reference for the tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reference_bits(seed: int, index: int) -> int:
    """Element ``index`` of ``random_bits(seed, ...)``, on Python integers."""
    unsigned = seed % 2**64
    low, high = unsigned & 0xFFFFFFFF, unsigned >> 32
    x = reference_lowbias32((index & 0xFFFFFFFF) ^ low)
    x = reference_lowbias32(x ^ high ^ ((index >> 32) * 0x9E3779B9 & 0xFFFFFFFF))
    return reference_lowbias32((x + 0x9E3779B9) & 0xFFFFFFFF)


def test_golden_values():
    for (seed, offset), expected in GOLDEN.items():
        assert random_bits(seed, len(expected), offset=offset).tolist() == expected


def test_tensor_hash_matches_python_reference():
    values = [0, 1, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF] + np.random.default_rng(0).integers(0, 2**32, 500).tolist()
    x = torch.tensor(values, dtype=torch.int64)
    assert lowbias32(x).tolist() == [reference_lowbias32(v) for v in values]
    assert mul32(x, 0xDEADBEEF).tolist() == [(v * 0xDEADBEEF) % 2**32 for v in values]


@pytest.mark.gpu
def test_same_bits_on_cuda():
    for (seed, offset), expected in GOLDEN.items():
        assert random_bits(seed, len(expected), "cuda", offset).cpu().tolist() == expected
    assert torch.equal(random_normal(7, (64, 64), "cuda").cpu(), random_normal(7, (64, 64)))


def test_streams_are_sliceable_and_seed_dependent():
    assert torch.equal(random_bits(5, 10, offset=7), random_bits(5, 17)[7:])
    # Across the CPU's block boundaries too: a block-sized slice at an odd offset equals the long stream.
    long = random_bits(5, 3 * CPU_BLOCK + 11)
    assert torch.equal(random_bits(5, CPU_BLOCK + 3, offset=CPU_BLOCK - 1), long[CPU_BLOCK - 1:2 * CPU_BLOCK + 2])
    assert torch.equal(long[-5:], torch.tensor([reference_bits(5, i) for i in range(3 * CPU_BLOCK + 6, 3 * CPU_BLOCK + 11)]))
    assert not torch.equal(random_bits(5, 100), random_bits(6, 100))
    assert seed_from_name(1, "a") == seed_from_name(1, "a") != seed_from_name(1, "b")


def test_distributions():
    n = 200_000
    bits = random_bits(11, n)
    assert bits.min() >= 0 and bits.max() < 2**32
    int8 = random_int8(11, (n,)).float()
    assert int8.min() == -128 and int8.max() == 127 and abs(int8.mean()) < 1.0
    uniform = random_uniform(12, (n,))
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    normal = random_normal(13, (n,))
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    for keep in (0.1, 0.5, 0.9):
        assert abs(random_mask(14, (n,), keep).float().mean() - keep) < 0.005


def seeded_options(**kwargs):
    return SeededLinear.Options(**kwargs)


def test_seeded_linear_masks_and_scale():
    torch.manual_seed(0)
    layer = SeededLinear(256, 128, seeded_options(keep=0.3, rank=8))
    generated = layer.generated(layer.build)
    assert abs((generated != 0).float().mean() - 0.3) < 0.02  # prune supermask keeps 30%
    dense_like = SeededLinear(256, 128, seeded_options(fine_scale=0, fine_shift=0, sign_mask=False))
    unsigned = dense_like.generated(dense_like.build)
    assert abs(unsigned.std() - 1) < 0.15  # the low-rank product is normalised to unit variance
    assert torch.linalg.matrix_rank(unsigned) == 16  # rank as configured
    flipped = SeededLinear(256, 128, seeded_options(fine_scale=0, fine_shift=0, sign_mask=True))
    flipped.seeds.copy_(dense_like.seeds)
    signs = torch.sign(flipped.generated(flipped.build)) * torch.sign(unsigned)
    assert abs((signs < 0).float().mean() - 0.5) < 0.02  # the sign supermask flips half
    assert layer.weight().std().item() == pytest.approx(layer.generated(layer.build).std().item() / 16, rel=1e-5)


def test_generated_weights_are_cached_until_a_seed_changes():
    layer = SeededLinear(32, 16, seeded_options())
    first = layer.generated(layer.build)
    assert layer.generated(layer.build) is first
    layer.seeds[2] += 1
    second = layer.generated(layer.build)
    assert second is not first and not torch.equal(second, first)


def test_orthogonal_basis_is_orthogonal_unique_and_deterministic():
    torch.manual_seed(0)
    for out_f, in_f in ((64, 64), (32, 96), (96, 32)):
        layer = OrthogonalLoRALinear(in_f, out_f, OrthogonalLoRALinear.Options(rank=4))
        q = layer.generated(layer.build).double() / (max(out_f, in_f) / in_f) ** 0.5
        gram = q @ q.T if out_f <= in_f else q.T @ q
        torch.testing.assert_close(gram, torch.eye(min(out_f, in_f), dtype=torch.float64), atol=1e-5, rtol=0)
        twin = OrthogonalLoRALinear(in_f, out_f, OrthogonalLoRALinear.Options(rank=4))
        twin.seeds.copy_(layer.seeds)
        assert torch.equal(twin.generated(twin.build), layer.generated(layer.build))


@pytest.mark.parametrize("linear", [{"kind": "seeded", "rank": 8, "keep": 0.5},
                                    {"kind": "orthogonal-lora", "rank": 4}, {"kind": "gaussian-lora", "rank": 4}])
def test_seeded_models_pack_to_seeds_and_reload_identically(linear, tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, max_seq_len=32, mixer={"kind": "attention", "n_heads": 4},
                      linear=linear)
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loaded = LoadedModel(model, RunConfig(model=cfg), ByteTokenizer(), tmp_path)
    path = tmp_path / "m.seedbed"
    pack_model(loaded, path, QuantRule.parse("fp32,*lora_*=fp32"))  # adapters default to int8: keep them exact
    torch.manual_seed(99)  # a different init: everything must come from the artifact
    again = load_artifact(path).model
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    assert virtual_parameters(model) > count_parameters(model) or linear["kind"] != "seeded"
    # Seeds travel as 8-byte integers, never as generated weights.
    seeds = [t for name, t in again.state_dict().items() if name.endswith("seeds")]
    assert seeds and all(t.dtype == torch.int64 for t in seeds)
    assert path.stat().st_size < 4 * count_parameters(model) + 16_000


def test_germinator_preset_trains_and_packs_to_seeds(small_corpus, tmp_path):
    from seedbed.config import resolve_config
    from seedbed.pack.pack import describe
    from seedbed.runs import load
    from seedbed.train.trainer import Trainer

    cfg = resolve_config("germinator", overrides=[
        "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", "train.batch_size=4", "train.steps=4",
        "train.dtype=fp32", "train.device=cpu", f'data.spec="{small_corpus}"'])
    result = Trainer(cfg, tmp_path / "run", progress=False).run()
    assert 0 < result.val_bpb < 9
    path = tmp_path / "g.seedbed"
    pack_model(load(tmp_path / "run"), path, QuantRule.parse("int8"))
    model = load_artifact(path).model
    stored, virtual = count_parameters(model), virtual_parameters(model)
    assert virtual > 2 * stored  # most weights are generated, not stored
    assert f"{virtual:,} virtual" in describe(path)


def test_lora_adapters_are_stored_int8_per_row_and_reload_close(tmp_path):
    from seedbed.pack.artifact import read_artifact

    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, max_seq_len=32, mixer={"kind": "attention", "n_heads": 4},
                      linear={"kind": "orthogonal-lora", "rank": 8})
    model = LM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "m.seedbed"
    pack_model(LoadedModel(model, RunConfig(model=cfg), ByteTokenizer(), tmp_path), path, QuantRule.parse("int8"))
    kinds = {entry["name"]: entry["kind"] for entry in read_artifact(path).manifest["tensors"]}
    adapters = [name for name in kinds if "lora_" in name]
    assert adapters and all(kinds[name] == "int8" for name in adapters)  # small tensors, int8 all the same
    assert all(kinds[name] == "raw" for name in kinds if name.endswith("seeds"))
    again = load_artifact(path).model
    for name, tensor in again.state_dict().items():
        if "lora_" in name:
            original = model.state_dict()[name]
            # int8 per row: within half a step (row absmax / 127) of the original, plus the fp16 scale's rounding
            step = original.abs().amax(dim=1, keepdim=True) / 127
            assert torch.all((tensor - original).abs() <= 0.6 * step + 1e-8)
