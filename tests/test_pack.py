"""Artifacts: storage kinds round-trip, packed models reproduce their logits, bytes add up."""

import shutil

import numpy as np
import pytest
import torch

from seedbed.errors import UserError
from seedbed.pack.artifact import HEADER, QuantRule, read_artifact
from seedbed.pack.kinds import KINDS, get_kind, pack_bits, unpack_bits
from seedbed.pack.pack import describe, load_artifact, pack_model
from seedbed.runs import load

from run_cli import seedbed




@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("count", [1, 5, 64, 1001])
def test_bit_packing_round_trips(bits, count):
    values = np.random.default_rng(count).integers(0, 2**bits, count)
    packed = pack_bits(values, bits)
    per_group, group_bytes = {2: (4, 1), 4: (2, 1), 6: (4, 3)}[bits]
    assert len(packed) == -(-count // per_group) * group_bytes
    assert np.array_equal(unpack_bits(packed, bits, count), values)


# Worst-case error of each lossy kind relative to the largest |w| in its scale group.
TOLERANCE = {"fp16": 1e-3, "bf16": 8e-3, "int8": 1 / 254 + 1e-3, "int6": 1 / 62 + 1e-3, "int4": 1 / 14 + 1e-3}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("shape", [(7,), (33, 70), (4, 3, 5)])
def test_every_storage_kind_round_trips(kind, shape):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    if kind == "raw":
        t = torch.randint(-2**62, 2**62, shape, dtype=torch.int64)
    data, params = get_kind(kind).encode(t, {"clip_percentile": 100.0, "group": 16})
    back = get_kind(kind).decode(data, params, tuple(shape))
    assert back.shape == t.shape
    if get_kind(kind).lossless:
        assert torch.equal(back, t)
    elif kind == "ternary":
        scale = t.abs().mean()
        assert set(torch.unique(torch.round(back / scale)).tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(back, torch.clamp(torch.round(t / scale), -1, 1) * scale)
    else:
        assert (back - t).abs().max() <= TOLERANCE[kind] * t.abs().max()


def test_storage_sizes_are_what_the_kinds_promise():
    t = torch.randn(128, 256)
    size = lambda kind: len(get_kind(kind).encode(t, {"group": 64})[0])
    assert size("fp16") == 2 * t.numel()
    assert size("int8") == t.numel() + 2 * 128  # one fp16 scale per row
    assert size("int4") == t.numel() // 2 + 2 * t.numel() // 64
    assert size("int6") == 3 * t.numel() // 4 + 2 * t.numel() // 64
    assert size("ternary") == -(-t.numel() // 5) + 4  # 5 trits per byte + an fp32 scale


def test_fp32_artifact_reproduces_logits_exactly_and_int8_closely(tiny_model, tmp_path):
    tokens = torch.tensor([list(b"To be, or not to be, that is the question:")])
    with torch.no_grad():
        reference = tiny_model.model(tokens)
        pack_model(tiny_model, tmp_path / "fp32.seedbed", QuantRule.parse("fp32"))
        assert torch.equal(load_artifact(tmp_path / "fp32.seedbed").model(tokens), reference)
        pack_model(tiny_model, tmp_path / "fp16.seedbed", QuantRule.parse("fp16"))
        fp16 = load_artifact(tmp_path / "fp16.seedbed").model(tokens)
        # This model's matrices are all below the small-tensor size: force int8 with a pattern.
        pack_model(tiny_model, tmp_path / "int8.seedbed", QuantRule.parse("*=int8"))
        int8 = load_artifact(tmp_path / "int8.seedbed").model(tokens)
    spread = reference.std().item()
    assert (fp16 - reference).abs().max() < 0.01 * spread
    assert (int8 - reference).abs().max() < 0.1 * spread
    sizes = {q: (tmp_path / f"{q}.seedbed").stat().st_size for q in ("fp32", "fp16", "int8")}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_quant_rule_patterns_and_small_tensors(tiny_model):
    rule = QuantRule.parse("int4,embed.weight=int8,*.ffn.down.*=int6")
    state = tiny_model.model.state_dict()
    kinds = {name: rule.kind_for(name, t) for name, t in state.items()}
    assert kinds["embed.weight"] == "int8"
    assert kinds["blocks.0.ffn.down.weight"] == "int6"
    assert kinds["final_norm.weight"] == "fp16"  # 1-D: small tensors stay in floats
    with pytest.raises(UserError, match="unknown storage kind 'int3'"):
        QuantRule.parse("int3")


def test_byte_breakdown_accounts_for_every_byte(tiny_model, tmp_path):
    path = tmp_path / "a.seedbed"
    result = pack_model(tiny_model, path, QuantRule.parse("int6,embed.weight=int8"))
    artifact = read_artifact(path)
    assert result.size == path.stat().st_size == artifact.file_size
    text = describe(path)
    total_line = next(line for line in text.splitlines() if line.strip().startswith("total"))
    assert int(total_line.split()[-1].replace(",", "")) == artifact.payload_size
    section_lines = text.split("raw payload by section:")[1].split("raw payload by storage kind:")[0]
    rows = [line for line in section_lines.splitlines() if line.strip() and not line.strip().startswith("total")]
    assert sum(int(line[42:55].replace(",", "")) for line in rows) == artifact.payload_size
    assert f"{HEADER.size} header + {path.stat().st_size - HEADER.size:,}" in text
    stored = sum(t.numel() for t in tiny_model.model.state_dict().values())
    assert f"{stored:,} stored, {stored:,} virtual" in text


def test_budget_too_small_names_the_excess_and_writes_nothing(tiny_model, tmp_path):
    path = tmp_path / "over.seedbed"
    with pytest.raises(UserError, match=r"over the budget of 1,000; largest groups by parameters: blocks\.\*\.ffn"):
        pack_model(tiny_model, path, QuantRule.parse("int8"), budget=1000)
    assert not path.exists()


def test_corrupted_and_truncated_artifacts_are_rejected(tiny_model, tmp_path):
    path = tmp_path / "a.seedbed"
    pack_model(tiny_model, path, QuantRule.parse("int8"))
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.seedbed"
    bad.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match="truncated"):
        read_artifact(bad)
    data[len(data) // 2] ^= 0x40
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        read_artifact(bad)
    bad.write_bytes(b"PK\x03\x04 not an artifact at all" * 4)
    with pytest.raises(UserError, match="not a seedbed artifact"):
        read_artifact(bad)


def test_cli_pack_info_eval_generate_on_artifact(tiny_run, tmp_path):
    path = tmp_path / "model.seedbed"
    packed = seedbed("pack", str(tiny_run), "-o", str(path), "--eval-tokens", "4000")
    assert packed.returncode == 0, packed.stderr
    before = float(packed.stdout.split("before packing ")[1].split()[0])
    after = float(packed.stdout.split("  after ")[1].split()[0])
    assert abs(after - before) < 0.02  # int8 loses little
    info = seedbed("info", str(path))
    assert info.returncode == 0 and f"{path.stat().st_size:,} bytes" in info.stdout
    run_eval = seedbed("eval", str(tiny_run))
    art_eval = seedbed("eval", str(path))
    assert art_eval.returncode == 0, art_eval.stderr
    bpb = lambda out: float(out.split("bpb ")[1].split()[0])
    assert abs(bpb(art_eval.stdout) - bpb(run_eval.stdout)) < 0.02
    sample = seedbed("generate", str(path), "--prompt", "KING", "--tokens", "20", "--seed", "0")
    assert sample.returncode == 0 and sample.stdout.startswith("KING")
    over = seedbed("pack", str(tiny_run), "-o", str(tmp_path / "small.seedbed"), "--budget", "5000")
    assert over.returncode == 2 and "over the budget of 5,000" in over.stderr
    assert not (tmp_path / "small.seedbed").exists()


def test_pack_reuses_the_runs_recorded_val_bpb_only_when_it_is_the_same_number(tiny_run, tmp_path):
    loaded = load(tiny_run)
    recomputed = loaded.evaluate_split(loaded.config.data.spec, "val").bpb
    assert loaded.recorded_val_bpb == pytest.approx(recomputed, rel=1e-6)
    # A record of another step (the weights changed since) or another stride is not reused.
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    metrics = copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"step": 60, "val_bpb"', '"step": 59, "val_bpb"'))
    assert load(copy).recorded_val_bpb is None
    shutil.copy(tiny_run / "metrics.jsonl", metrics)
    config = copy / "config.toml"
    config.write_text(config.read_text().replace("eval_stride = 0", "eval_stride = 16"))
    assert load(copy).recorded_val_bpb is None
