"""bf16 only where the hardware runs it natively: the choice follows the CPU's reported flags."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seedbed.config import resolve_config
from seedbed.hardware import cpu_has_fast_bf16, describe_machine, fast_dtype
from seedbed.train.trainer import Trainer, pick_autocast

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_attention_math"}
AVX2_ONLY = "fpu sse sse2 avx avx2 fma f16c"
WITH_AMX = AVX2_ONLY + " avx512f avx512_bf16 amx_tile amx_bf16"


class MatmulDtypes(TorchDispatchMode):
    """Counts every matmul-like aten op by the dtype of its first tensor argument."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.counts[dtype] += 1
        return func(*args, **(kwargs or {}))


def one_training_step(small_corpus, tmp_path, monkeypatch) -> Counter:
    # The MFU peak is not under test; measuring it in emulated bf16 would take minutes.
    monkeypatch.setattr("seedbed.train.trainer.matmul_peak", lambda device, dtype: 1e12)
    cfg = resolve_config("gpt", overrides=[
        "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=2", "train.steps=1", "train.threads=1", "train.device=cpu", f'data.spec="{small_corpus}"'])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with MatmulDtypes() as mode:
        trainer.train_step()
    return mode.counts


def test_a_cpu_without_bf16_units_trains_with_no_bf16_matmul(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDBED_CPU_FLAGS", AVX2_ONLY)
    assert not cpu_has_fast_bf16() and fast_dtype(torch.device("cpu")) == torch.float32
    counts = one_training_step(small_corpus, tmp_path, monkeypatch)
    # Forward, backward and Muon's Newton-Schulz all ran, all in fp32.
    assert counts[torch.float32] > 20
    assert counts[torch.bfloat16] == 0


def test_a_cpu_with_bf16_units_uses_bf16(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDBED_CPU_FLAGS", WITH_AMX)
    assert cpu_has_fast_bf16() and fast_dtype(torch.device("cpu")) == torch.bfloat16
    counts = one_training_step(small_corpus, tmp_path, monkeypatch)
    assert counts[torch.bfloat16] > 20


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, None), (WITH_AMX, torch.bfloat16)])
def test_autocast_follows_the_flags_unless_forced(flags, expected, monkeypatch):
    monkeypatch.setenv("SEEDBED_CPU_FLAGS", flags)
    cpu = torch.device("cpu")
    assert pick_autocast("auto", cpu) == expected
    assert pick_autocast("fp32", cpu) is None
    assert pick_autocast("bf16", cpu) == torch.bfloat16


def test_benchmark_line_names_the_cpu_and_its_flags(monkeypatch):
    monkeypatch.setenv("SEEDBED_CPU_FLAGS", AVX2_ONLY)
    line = describe_machine()
    assert "flags: avx2 fma;" in line and "fast bf16: no" in line
    monkeypatch.setenv("SEEDBED_CPU_FLAGS", WITH_AMX)
    assert "avx512_bf16 amx_bf16" in describe_machine() and "fast bf16: yes" in describe_machine()
