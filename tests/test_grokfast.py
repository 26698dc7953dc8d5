"""Grokfast (train/grokfast.py): the filters against hand-computed numbers, and in the trainer."""

import json
import re

import pytest
import torch
from torch import nn

from seedbed.config import resolve_config
from seedbed.errors import UserError
from seedbed.train.grokfast import GradFilter
from seedbed.train.trainer import Trainer

from test_train import TINY, seedbed, tiny_config

# Three steps of gradients for a model of two parameters, as exact binary fractions.
GRADS = [{"w": [1.0, -2.0], "b": [4.0]}, {"w": [3.0, 0.0], "b": [-4.0]}, {"w": [-1.0, 2.0], "b": [8.0]}]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))


def filtered(grad_filter: GradFilter, steps=GRADS) -> list[dict[str, list[float]]]:
    """The gradients after the filter, step by step; each step's raw gradient comes from a backward."""
    model, out = Tiny(), []
    for grads in steps:
        model.zero_grad(set_to_none=True)
        # d/dp of sum(g * p) is g: the backward hands the filter exactly these gradients.
        loss = (torch.tensor(grads["w"]) * model.w).sum() + (torch.tensor(grads["b"]) * model.b).sum()
        loss.backward()
        grad_filter.apply(model.named_parameters())
        out.append({name: p.grad.tolist() for name, p in model.named_parameters()})
    return out


def test_ema_matches_a_hand_computed_ema():
    # alpha 0.5, lamb 2; e starts at the first gradient, so e_1 = g_1:
    # w: e = [1, -2]     -> g' = [1, -2] + 2 [1, -2]     = [3, -6]
    #    e = [2, -1]     -> g' = [3, 0] + 2 [2, -1]      = [7, -2]
    #    e = [0.5, 0.5]  -> g' = [-1, 2] + 2 [0.5, 0.5]  = [0, 3]
    # b: e = 4 -> 12;  e = 0 -> -4;  e = 4 -> 16
    assert filtered(GradFilter("ema", alpha=0.5, lamb=2.0)) == [
        {"w": [3.0, -6.0], "b": [12.0]}, {"w": [7.0, -2.0], "b": [-4.0]}, {"w": [0.0, 3.0], "b": [16.0]}]


def test_ema_with_the_papers_alpha():
    # alpha 0.98, lamb 2 on w[0] = 1, 3, -1: e = 1, 1.04, 0.9992; g' = 3, 5.08, 0.9984
    out = filtered(GradFilter("ema", alpha=0.98, lamb=2.0))
    assert [step["w"][0] for step in out] == pytest.approx([3.0, 5.08, 0.9984], abs=1e-6)


def test_ma_matches_a_hand_computed_windowed_mean():
    # window 2, lamb 2: step 1 warms up (untouched); then g' = g + 2 * mean(last two raw gradients).
    # w: [1, -2];  [3, 0] + 2 [2, -1] = [7, -2];  [-1, 2] + 2 [1, 1] = [1, 4]
    # b: 4;        -4 + 2 * 0 = -4;               8 + 2 * 2 = 12
    assert filtered(GradFilter("ma", lamb=2.0, window=2)) == [
        {"w": [1.0, -2.0], "b": [4.0]}, {"w": [7.0, -2.0], "b": [-4.0]}, {"w": [1.0, 4.0], "b": [12.0]}]


def test_ma_window_of_three_waits_for_three_gradients():
    # window 3, lamb 1: steps 1 and 2 untouched, step 3 adds the mean of all three raw gradients.
    out = filtered(GradFilter("ma", lamb=1.0, window=3))
    assert out[:2] == GRADS[:2]
    assert out[2]["w"] == pytest.approx([-1 + 3 / 3, 2 + 0 / 3], abs=1e-6)
    assert out[2]["b"] == pytest.approx([8 + 8 / 3], abs=1e-6)


def test_none_leaves_gradients_untouched():
    assert filtered(GradFilter("none")) == GRADS
    assert not GradFilter("none") and GradFilter("none").state() == {}


def test_state_round_trips_mid_run():
    """A filter restored from another's state continues exactly as the original would."""
    for kind in ("ema", "ma"):
        original = GradFilter(kind, alpha=0.5, lamb=2.0, window=2)
        filtered(original, GRADS[:2])
        restored = GradFilter(kind, alpha=0.5, lamb=2.0, window=2)
        restored.restore({**original.state(), "model.w": torch.zeros(2)})
        assert filtered(restored, GRADS[2:]) == filtered(original, GRADS[2:])


@pytest.mark.parametrize("override, message", [
    ("train.grokfast=sma", "train.grokfast must be none, ema or ma, got 'sma'"),
    ("train.grokfast_alpha=1.0", "train.grokfast_alpha must be in [0, 1), got 1.0"),
    ("train.grokfast_lamb=-2", "train.grokfast_lamb must be >= 0, got -2"),
    ("train.grokfast_window=0", "train.grokfast_window must be positive, got 0"),
    ("train.grokfast_window=2.5", "train.grokfast_window: expected an integer"),
    ("train.eval_every_steps=-1", "train.eval_every_steps must be >= 0, got -1"),
])
def test_bad_config_values_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        resolve_config("gpt", overrides=[override])
    assert "\n" not in str(err.value)


def trained(corpus, folder, *overrides) -> dict[str, torch.Tensor]:
    trainer = Trainer(tiny_config(corpus, "train.steps=3", *overrides), folder, progress=False)
    trainer.run()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_trainer_filters_and_none_changes_nothing(small_corpus, tmp_path):
    plain = trained(small_corpus, tmp_path / "plain")
    # lamb 0 runs the whole filter but adds nothing: the same weights as no filter, bit for bit.
    silent = trained(small_corpus, tmp_path / "silent", "train.grokfast=ema", "train.grokfast_lamb=0.0")
    ema = trained(small_corpus, tmp_path / "ema", "train.grokfast=ema")
    assert all(torch.equal(plain[name], silent[name]) for name in plain)
    assert any(not torch.equal(plain[name], ema[name]) for name in plain)


def test_cli_trains_on_modular_data_and_reports_answer_accuracy(tmp_path):
    run = tmp_path / "m7"
    out = seedbed("train", "--data", "modular:7", "--steps", "5", "--out", str(run), "--no-progress",
                  *TINY, "train.eval_every_steps=2", "train.grokfast=ema")
    assert out.returncode == 0, out.stderr
    assert "modular:7: 49 equations a+b=c mod 7" in out.stderr and "val answer accuracy" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if "val_bpb_partial" in r]
    assert [r["step"] for r in periodic] == [2, 4] and all(r["val_answers"] == 12 for r in periodic)
    final = records[-1]
    assert final["step"] == 5 and 0 <= final["val_answer_accuracy"] <= 1 and final["val_answers"] == 12
    scored = seedbed("eval", str(run))
    assert scored.returncode == 0, scored.stderr
    assert f"bpb {final['val_bpb']:.4f}" in scored.stdout
    assert f"answer accuracy {final['val_answer_accuracy']:.2%} ({round(12 * final['val_answer_accuracy'])} of 12 " \
           "equations right" in scored.stdout


def modular_trainer(folder, spec: str, *overrides: str) -> Trainer:
    return Trainer(tiny_config(spec, *overrides), folder, progress=False)


def test_loss_on_answers_keeps_only_the_answer_targets(tmp_path):
    trainer = modular_trainer(tmp_path / "run", "modular:11:bytes", "train.loss_on=answers", "train.steps=4")
    inputs, targets = trainer.batch()
    kept = targets != -100
    # In the bytes form an answer is the one byte after '=': exactly the kept targets.
    assert torch.equal(kept, inputs == ord("="))
    assert bool((targets[kept] >= 0x80).all()) and int(kept.sum()) >= 5 * inputs.shape[0]
    _, every = modular_trainer(tmp_path / "all", "modular:11:bytes").batch()
    assert bool((every != -100).all())
    result = trainer.run()  # the loss over answers alone trains and is logged as bits per answer
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps > 0 and any("train_answer_bits" in r for r in records)
    assert not any("train_bpb" in r for r in records)


@pytest.mark.parametrize("spec, overrides, message", [
    ("modular:11", ["model.max_seq_len=7"], "needs model.max_seq_len >= 8 (tokens from one answer to the next), got 7"),
    ("default", [], "train.loss_on=answers needs modular:P data"),
])
def test_loss_on_answers_needs_answers_in_every_window(tmp_path, spec, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        modular_trainer(tmp_path / "run", spec, "train.loss_on=answers", *overrides)


def test_bench_reads_the_first_step_at_99_percent(tmp_path):
    from seedbed.bench.grokfast import read_row

    records = [{"step": 25, "val_bpb_partial": 2.2, "val_answer_accuracy": 0.5, "train_seconds": 10.0},
               {"step": 25, "train_loss": 1.0, "train_answer_bits": 1.44},
               {"step": 50, "val_bpb_partial": 1.6, "val_answer_accuracy": 0.991, "train_seconds": 20.0},
               {"step": 75, "val_bpb_partial": 1.5, "val_answer_accuracy": 1.0, "train_seconds": 30.0},
               {"step": 80, "val_bpb": 1.49, "val_answer_accuracy": 0.998, "train_seconds": 32.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = read_row("ema", tmp_path)
    assert (row.first_step, row.first_seconds, row.steps, row.val_accuracy, row.val_bpb, row.train_answer_bits) == \
        (50, 20.0, 80, 0.998, 1.49, 1.44)
    # The final eval counts too; a run that never gets there has no step.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2] + records[-1:]))
    assert read_row("late", tmp_path).first_step == 80
    records[-1]["val_answer_accuracy"] = 0.9
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2] + records[-1:]))
    assert read_row("none", tmp_path).first_step is None
