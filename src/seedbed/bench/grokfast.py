"""``seedbed bench grokfast``: grokking on modular addition, without and with Grokfast.

The grokking papers' tiny transformer (``GROKKING``: 2 layers, width 128, AdamW lr 1e-3) trains
on ``modular:97:bytes`` (half of the 9,409 equations a+b=c mod 97 for training, the other half
val and test; each number one byte token; the loss on the answer tokens only, as the papers
train) once per row of ``SETTINGS``: no filter at Power et al.'s weight decay 1 and at Lee et
al.'s 0, then the ema and ma filters at Lee et al.'s settings, each for the same minutes of
timed steps in its own process. Every ``EVAL_EVERY`` steps the trainer scores the whole val
split (``val_answer_accuracy``), so the table can say at which step, and after how many seconds
of training, accuracy first reached 99%.

What we measured (BENCHMARKS.md): no delayed generalisation to accelerate. With ~680
equations a step, val accuracy passes 99% a few hundred steps in without any filter, as soon
as the training answers are learned; the ma filter (untouched for its first 99 steps) gets
there too, and the ema filter from step 1 holds the model at the uniform answer (log2 97 =
6.6 bits) for the whole budget. In the digits form (``modular:97``) the same model had not left
the no-answer plateau in 3,300 steps, hence the bytes form here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from seedbed.bench.models import in_fresh_process
from seedbed.bench.train import write_section
from seedbed.hardware import describe_machine

SPEC = "modular:97:bytes"
EVAL_EVERY = 25
TARGET = 0.99
# The grokking papers' model and optimiser (2 layers, width 128, 4 heads; AdamW lr 1e-3, betas
# (0.9, 0.98), 10 warm-up steps, no clipping; train fraction 0.5), each number one token, the
# loss on the answer tokens only; seedbed's byte stream in windows: 64 windows of 64 bytes, about
# 680 equations a step, against the papers' 512.
GROKKING = ["model.d_model=128", "model.n_layers=2", "model.mixer.n_heads=4", "model.max_seq_len=64",
            "train.batch_size=64", "train.optimizer=adamw", "train.lr=0.001", "train.beta1=0.9", "train.beta2=0.98",
            "train.warmup_steps=10", "train.schedule=constant", "train.grad_clip=0", "train.dtype=fp32",
            "train.loss_on=answers"]
MEASURE = [f"train.eval_every_steps={EVAL_EVERY}", f"train.log_every={EVAL_EVERY}",
           "train.checkpoint_every_seconds=3600"]
EMA = ["train.grokfast=ema", "train.grokfast_alpha=0.98", "train.grokfast_lamb=2.0"]
MA = ["train.grokfast=ma", "train.grokfast_window=100", "train.grokfast_lamb=5.0"]
SETTINGS = [  # (label, overrides): Power et al.'s weight decay 1, then Lee et al.'s baseline and filters
    ("none, weight decay 1", ["train.grokfast=none", "train.weight_decay=1.0"]),
    ("none, weight decay 0", ["train.grokfast=none", "train.weight_decay=0"]),
    ("ema (alpha 0.98, lamb 2), weight decay 0.005", [*EMA, "train.weight_decay=0.005"]),
    ("ma (window 100, lamb 5), weight decay 0.01", [*MA, "train.weight_decay=0.01"]),
    ("ema (alpha 0.98, lamb 2), weight decay 1", [*EMA, "train.weight_decay=1.0"]),
]


@dataclass
class GrokRow:
    label: str
    steps: int
    train_seconds: float
    first_step: int | None  # the first eval with val answer accuracy >= TARGET
    first_seconds: float | None
    val_accuracy: float  # the final eval: the whole val split, fp32
    val_bpb: float
    train_answer_bits: float  # the last logged training loss, bits per answer


def read_row(label: str, run_dir: Path) -> GrokRow:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = next((r for r in records if r.get("val_answer_accuracy", 0.0) >= TARGET), None)
    final = records[-1]
    train_bits = next(r["train_answer_bits"] for r in reversed(records) if "train_answer_bits" in r)
    return GrokRow(label, final["step"], final["train_seconds"], reached and reached["step"],
                   reached and reached["train_seconds"], final["val_answer_accuracy"], final["val_bpb"], train_bits)


def _train(label: str, overrides: list[str], minutes: float, run_dir: Path, queue) -> None:
    from seedbed.config import resolve_config
    from seedbed.train.trainer import Trainer

    try:
        cfg = resolve_config("gpt", overrides=[f'data.spec="{SPEC}"', *GROKKING, *MEASURE, *overrides,
                                               f"train.minutes={minutes}", "train.steps=0"])
        Trainer(cfg, run_dir, progress=True).run()
        queue.put(read_row(label, run_dir))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[{label}] {type(error).__name__}: {error}"))


def bench_grokfast(minutes: float, output: Path) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, overrides) in enumerate(SETTINGS):
            print(f"[{label}] training on {SPEC} for {minutes:g} min ...", file=sys.stderr)
            rows.append(in_fresh_process(_train, label, overrides, minutes, Path(tmp) / f"run{index}"))
    lines = [
        "## seedbed bench grokfast",
        "",
        f"`seedbed bench grokfast --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Each row trains the same model from the same seed on `{SPEC}` (each number one byte token, "
        "train fraction 0.5, the training loss on the answer tokens only) for "
        f"{minutes:g} minutes of timed steps in its own process: the gpt preset with `{' '.join(GROKKING)}`. "
        f"Every {EVAL_EVERY} steps the whole val split (2,352 equations) is scored; an equation counts as right "
        f"when the argmax at its answer byte is right. \"Reached\" is the first such eval at >= {TARGET:.0%}; "
        "seconds are timed training steps only (evaluation excluded). Train bits/answer: the last logged "
        "training loss (a window's first answer may lack its a and b, so it stays above 0). The last two columns "
        "are the final full-split eval (bpb over every byte: the a and b are not trained). Steps are the measure; "
        "seconds depend on what else ran on the machine.",
        "",
        f"| Grokfast | val accuracy >= {TARGET:.0%} at step | at seconds | steps | steps/s | final val accuracy "
        "| train bits/answer | final val bpb |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        reached = (f"{r.first_step:,}", f"{r.first_seconds:,.0f}") if r.first_step is not None else \
            (f"not within {r.steps:,} steps", "-")
        rate = r.steps / max(r.train_seconds, 1e-9)
        lines.append(f"| {r.label} | {reached[0]} | {reached[1]} | {r.steps:,} | {rate:.2f} "
                     f"| {r.val_accuracy:.2%} | {r.train_answer_bits:.3f} | {r.val_bpb:.4f} |")
    write_section(output, "## seedbed bench grokfast", "\n".join(lines) + "\n")
    print("\n".join(lines))
