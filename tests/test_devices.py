"""Choosing the training device: a machine's GPUs are shared out one per local rank, and anything
else ends in one line before a process group starts (a rank waiting for a GPU that does not exist
would leave the others hanging in NCCL). Runs without a GPU by faking one: the choice touches no
device before its checks."""

import subprocess

import pytest
import torch

from seedbed.errors import UserError
from seedbed.train.trainer import Distributed, pick_device  # the real one (conftest guards the trainer's)
from test_train import TINY, TORCHRUN, fake_gpus_env, needs_torchrun

ONE_GPU_TOO_FEW = r"^2 local ranks but 1 CUDA device on this machine: start at most 1 per node .*train.device=cpu"


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def ranks(local_rank: int, local_world: int) -> Distributed:
    return Distributed(rank=local_rank, world=local_world, local_rank=local_rank, local_world=local_world)


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_each_local_rank_gets_its_own_gpu(monkeypatch, name):
    fake_cuda(monkeypatch, 2)
    assert pick_device(name, ranks(0, 2)) == torch.device("cuda", 0)
    assert pick_device(name, ranks(1, 2)) == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["auto", "cuda"])
@pytest.mark.parametrize("local_rank", [0, 1])
def test_every_rank_refuses_more_local_ranks_than_gpus(monkeypatch, name, local_rank):
    """Rank 0 has a GPU, yet refuses too: otherwise it would wait for rank 1 in the process group."""
    fake_cuda(monkeypatch, 1)
    with pytest.raises(UserError, match=ONE_GPU_TOO_FEW):
        pick_device(name, ranks(local_rank, 2))


def test_the_cpu_when_asked_or_when_there_is_no_gpu(monkeypatch):
    fake_cuda(monkeypatch, 1)
    assert pick_device("cpu", ranks(1, 2)) == torch.device("cpu")
    fake_cuda(monkeypatch, 0)
    assert pick_device("auto", ranks(1, 2)) == torch.device("cpu")
    with pytest.raises(UserError, match="^train.device=cuda but no CUDA device is available$"):
        pick_device("cuda", ranks(0, 1))


@needs_torchrun
def test_torchrun_with_more_ranks_than_gpus_ends_in_one_line(small_corpus, tmp_path):
    """Two ranks on a (fake) one-GPU machine at train.device=auto: each rank exits with the line, no
    hang, no traceback of seedbed's, no run folder."""
    run = tmp_path / "run"
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "seedbed", "train", "--out",
                          str(run), "--steps", "2", "--data", str(small_corpus), "--no-progress", *TINY,
                          "train.device=auto"],
                         capture_output=True, text=True, timeout=120, env=fake_gpus_env(tmp_path / "site", 1))
    assert out.returncode != 0
    refusals = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert refusals and all(line[len("error: "):].startswith("2 local ranks but 1 CUDA device") for line in refusals)
    assert "seedbed/train/trainer.py" not in out.stderr  # torchrun reports the failed ranks; seedbed prints no traceback
    assert not run.exists()
