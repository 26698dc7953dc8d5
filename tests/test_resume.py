"""`seedbed train --resume RUN key=value`: overrides that can change apply, the others are refused."""

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from seedbed.config import apply_overrides, config_from_dict, read_config_file
from seedbed.errors import UserError
from seedbed.train.checkpoint import load_checkpoint, save_checkpoint
from seedbed.train.trainer import Trainer

from test_cli_errors import assert_one_line_error
from test_train import TINY, TORCHRUN, final_weights, interrupt_at_step, needs_torchrun, seedbed, tiny_config


@pytest.fixture
def run(small_corpus, tmp_path) -> Path:
    """A finished 6-step run with its checkpoint."""
    folder = tmp_path / "run"
    Trainer(tiny_config(small_corpus, "train.steps=6"), folder, progress=False).run()
    return folder


def resumed_config(run: Path, *overrides: str):
    return config_from_dict(apply_overrides(read_config_file(run / "config.toml"), list(overrides)))


def test_a_new_learning_rate_is_obeyed(run):
    before = final_weights(run)
    # With both learning rates at zero the resumed steps cannot move any weight; the old code
    # kept the checkpoint's rates and moved them.
    cfg = resumed_config(run, "train.steps=10", "train.lr=0.0", "train.matrix_lr=0.0", "train.warmup_steps=0")
    trainer = Trainer(cfg, run, resume=True, progress=False)
    assert [g["initial_lr"] for opt in trainer.optimizers for g in opt.param_groups] == [0.0, 0.0]
    result = trainer.run()
    assert result.steps == 10
    after = final_weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tomllib.loads((run / "config.toml").read_text())["train"]["lr"] == 0.0


def test_a_new_rate_changes_the_trajectory_against_an_unchanged_resume(run, tmp_path):
    shutil.copytree(run, tmp_path / "same")
    Trainer(resumed_config(tmp_path / "same", "train.steps=10"), tmp_path / "same", resume=True, progress=False).run()
    Trainer(resumed_config(run, "train.steps=10", "train.matrix_lr=0.05"), run, resume=True, progress=False).run()
    a, b = final_weights(tmp_path / "same"), final_weights(run)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, key", [("model.d_model=48", "model.d_model"),
                                           ("model.mixer.n_heads=4", "model.mixer"),
                                           ("train.batch_size=8", "train.batch_size"),
                                           ("data.tokenizer=sp", "data.tokenizer"),
                                           ("train.seed=7", "train.seed")])
def test_overrides_that_cannot_change_are_refused_by_name(run, override, key):
    config_before = (run / "config.toml").read_bytes()
    checkpoint_before = (run / "checkpoint.safetensors").read_bytes()
    out = seedbed("train", "--resume", str(run), "--steps", "10", "--no-progress", override)
    assert_one_line_error(out, f"cannot resume with {key}", "cannot change mid-run")
    assert (run / "config.toml").read_bytes() == config_before
    assert (run / "checkpoint.safetensors").read_bytes() == checkpoint_before


def test_a_different_world_size_is_refused(run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="cannot resume with 2 processes: the checkpoint was trained with 1"):
        Trainer(resumed_config(run, "train.steps=10"), run, resume=True, progress=False)


def test_resume_extends_a_minutes_budget(small_corpus, tmp_path):
    folder = tmp_path / "timed"
    out = seedbed("train", "--out", str(folder), "--minutes", "0.04", "--data", str(small_corpus),
                  "--no-progress", *TINY)
    assert out.returncode == 0, out.stderr
    first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert 2.4 <= first["train_seconds"] < 3.5
    out = seedbed("train", "--resume", str(folder), "--minutes", "0.08", "--no-progress")
    assert out.returncode == 0, out.stderr
    second = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    # The budget counts timed training only, across both processes; warm-up is apart.
    assert 4.8 <= second["train_seconds"] < 6.0 and second["step"] > first["step"]
    assert second["warmup_seconds"] > first["warmup_seconds"] > 0


@needs_torchrun
def test_resume_under_torchrun(small_corpus, tmp_path):
    folder = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "seedbed", "train", "--no-progress"]
    out = subprocess.run(launch + ["--out", str(folder), "--steps", "4", "--data", str(small_corpus), *TINY],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run(launch + ["--resume", str(folder), "--steps", "8", "train.lr=0.001"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 8 and final["world"] == 2 and final["ranks_in_sync"] is True
    assert tomllib.loads((folder / "config.toml").read_text())["train"]["lr"] == 0.001


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_resume_with_grokfast_continues_exactly(small_corpus, tmp_path, kind):
    """The filter's state (the EMA, or the MA's window and count) travels in the checkpoint."""
    cfg = lambda: tiny_config(small_corpus, "train.steps=9", "train.checkpoint_every_steps=4",
                              f"train.grokfast={kind}", "train.grokfast_window=3")
    Trainer(cfg(), tmp_path / "straight", progress=False).run()
    interrupt_at_step(Trainer(cfg(), tmp_path / "split", progress=False), 7)
    tensors, meta = load_checkpoint(tmp_path / "split" / "checkpoint.safetensors")
    assert meta["step"] == 4 and any(name.startswith(f"grokfast.{kind}.") for name in tensors)
    Trainer(cfg(), tmp_path / "split", resume=True, progress=False).run()
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.safetensors")[0] for name in ("straight", "split"))
    kept = [name for name in a if name.startswith(("model.", "grokfast."))]
    assert kept and a.keys() == b.keys()
    for name in kept:
        assert torch.equal(a[name], b[name]), name


def test_grokfast_can_be_switched_on_and_over_mid_run(run):
    """Switched on at resume, the filter starts from the resumed step's gradient; a new kind drops the old state."""
    Trainer(resumed_config(run, "train.steps=8", "train.grokfast=ema"), run, resume=True, progress=False).run()
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["step"] == 8 and any(name.startswith("grokfast.ema.") for name in tensors)
    Trainer(resumed_config(run, "train.steps=10", "train.grokfast=ma", "train.grokfast_window=4"), run, resume=True,
            progress=False).run()
    tensors, _ = load_checkpoint(run / "checkpoint.safetensors")
    assert not any(name.startswith("grokfast.ema.") for name in tensors)
    assert {int(t) for name, t in tensors.items() if name.startswith("grokfast.ma_count.")} == {2}


def test_a_checkpoint_from_before_grokfast_resumes(run):
    """Runs saved before the grokfast and eval_every_steps keys existed resume without them."""
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    for key in ("grokfast", "grokfast_alpha", "grokfast_lamb", "grokfast_window", "eval_every_steps"):
        del meta["config"]["train"][key]
    meta.pop("format")
    save_checkpoint(run / "checkpoint.safetensors", tensors, meta)
    assert Trainer(resumed_config(run, "train.steps=8"), run, resume=True, progress=False).run().steps == 8
