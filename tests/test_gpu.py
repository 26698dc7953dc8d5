"""The checks that need a CUDA device: ``pytest -m gpu`` runs them alone (a few minutes on one
GPU); without a GPU they are skipped, with the reason shown.

What CUDA promises here and what it does not. Seeded weights have the same bits as on the CPU
(test_seeds.py). A run trained on CUDA learns what the same run learns on the CPU, and scores on
the CPU what it scored on CUDA, to float tolerance: the kernels sum in other orders (and bf16
rounds). Resuming continues the run to the same tolerance, not bit for bit as on the CPU: cuBLAS
and the atomics of some backward kernels do not promise reproducible sums.
"""

import subprocess

import pytest
import torch

from seedbed.cachemix import TextCache
from seedbed.config import resolve_config
from seedbed.data import load_dataset
from seedbed.ngram import NgramCache
from seedbed.train.trainer import Trainer
from test_train import (TINY, TORCHRUN, final_weights, interrupt_at_step, needs_torchrun, seedbed, tiny_config,
                        train_under_torchrun)

pytestmark = pytest.mark.gpu


def gpus() -> int:
    return torch.cuda.device_count()


def val_bpb_of(run) -> float:
    """The run's val bpb as ``seedbed eval`` scores it, on the CPU."""
    out = seedbed("eval", str(run))
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split("bpb ")[1].split()[0])


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 0.05), ("auto", 0.15)])
def test_cuda_training_learns_what_the_cpu_learns(small_corpus, tmp_path, dtype, tolerance):
    """40 steps of the same run on the CPU and on CUDA (fp32, then bf16 autocast where the GPU has it):
    the val bpb agree within the tolerance, and the CUDA run scores the same on the CPU (1e-3)."""
    cpu = Trainer(tiny_config(small_corpus, "train.steps=40"), tmp_path / "cpu", progress=False).run()
    trainer = Trainer(tiny_config(small_corpus, "train.steps=40", "train.device=cuda", f"train.dtype={dtype}"),
                      tmp_path / "cuda", progress=False)
    assert trainer.device.type == "cuda"
    expected = torch.bfloat16 if dtype == "auto" and torch.cuda.is_bf16_supported() else None
    assert trainer.autocast_dtype == expected
    cuda = trainer.run()
    assert cuda.val_bpb < 7.0 and abs(cuda.val_bpb - cpu.val_bpb) < tolerance, (cuda.val_bpb, cpu.val_bpb)
    assert abs(val_bpb_of(tmp_path / "cuda") - cuda.val_bpb) < 1e-3


def test_resume_on_cuda_continues_the_run(small_corpus, tmp_path):
    cfg = lambda: tiny_config(small_corpus, "train.steps=12", "train.checkpoint_every_steps=5", "train.device=cuda")
    straight = Trainer(cfg(), tmp_path / "straight", progress=False).run()
    interrupt_at_step(Trainer(cfg(), tmp_path / "split", progress=False), 8)
    resumed = Trainer(cfg(), tmp_path / "split", resume=True, progress=False).run()
    assert resumed.steps == straight.steps == 12
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)
    assert abs(resumed.val_bpb - straight.val_bpb) < 1e-3


@needs_torchrun
def test_more_ranks_than_gpus_ends_in_one_line(small_corpus, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(gpus() + 1), "-m", "seedbed", "train",
                          "--out", str(run), "--steps", "2", "--data", str(small_corpus), "--no-progress", *TINY,
                          "train.device=cuda"], capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert f"error: {gpus() + 1} local ranks but {gpus()} CUDA device" in out.stderr
    assert not run.exists()


@needs_torchrun
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs")
def test_cache_merged_over_nccl_equals_one_process(small_corpus, tmp_path):
    run = tmp_path / "ddp"
    out = train_under_torchrun(run, small_corpus, 4, "cache.orders=4", "cache.fit_tokens=1000", "train.device=cuda")
    assert "device cuda" in out.stderr
    merged = TextCache.from_bytes((run / "cache.bin").read_bytes()).ngram
    whole = NgramCache.count(load_dataset(str(small_corpus)).train.tokens, 256, 4)
    for a, b in zip(merged.orders, whole.orders, strict=True):
        for field in ("keys", "offsets", "tokens", "counts"):
            assert (getattr(a, field) == getattr(b, field)).all(), field


def test_the_gpt_preset_trains_faster_on_cuda_than_on_the_cpu(small_corpus, tmp_path):
    """A throughput smoke, side by side: 30 steps of the full-size gpt preset on each device."""
    speed = {}
    for device in ("cpu", "cuda"):
        cfg = resolve_config("gpt", overrides=[f'data.spec="{small_corpus}"', "train.steps=30", "train.eval_tokens=2000",
                                               f"train.device={device}"])
        speed[device] = Trainer(cfg, tmp_path / device, progress=False).run().tokens_per_second
    assert speed["cuda"] > 3 * speed["cpu"], speed
