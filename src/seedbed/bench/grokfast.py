"""``seedbed bench grokfast``: grokking on modular addition, without and with Grokfast.

One tiny transformer (``GROKKING``: the gpt preset at the settings of Lee et al. 2024 where
seedbed has them) trains on ``modular:97`` (half of the 9,409 equations a+b=c mod 97 for
training, the other half val and test) three times, with ``train.grokfast`` none, ema
and ma, each for the same minutes of timed steps in its own process. Every
``EVAL_EVERY`` steps the trainer scores the val split (``val_answer_accuracy``: an equation
is right when the argmax of every answer byte is), so the table can say at which step, and
after how many seconds of training, accuracy first reached 99%.

What to expect on a 2-core CPU (about 4 steps/s): nothing, for minutes. With numbers spelled
in digits, an answer digit depends on no single input digit (c is uniform given a alone), so
the model first sits on a plateau at the bpb of knowing the format but no answer (~2.2):
at P = 97 it did not leave it within 3,300 steps (none), 1,700 (ema) or 2,000 (Muon) in our
runs, where the paper's one-token numbers memorise in hundreds. Smaller P leave it sooner
(P = 23: about 400 steps without Grokfast, about 1,200 with ema) but had not grokked by
6,000 steps (val accuracy 40-55%).
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

SPEC = "modular:97"
EVAL_EVERY = 25
TARGET = 0.99
# The paper's modular-arithmetic settings (2 layers, width 128, 4 heads; AdamW lr 1e-3, betas
# (0.9, 0.98), weight decay 1.0 on every parameter, as seedbed's AdamW applies it; no clipping;
# train fraction 0.5) on seedbed's byte stream: 64 sequences of 64 bytes, about 455 equations a
# step, against the paper's 512.
GROKKING = ["model.d_model=128", "model.n_layers=2", "model.mixer.n_heads=4", "model.max_seq_len=64",
            "train.batch_size=64", "train.optimizer=adamw", "train.lr=0.001", "train.beta1=0.9", "train.beta2=0.98",
            "train.weight_decay=1.0", "train.warmup_steps=10", "train.schedule=constant", "train.grad_clip=0",
            "train.dtype=fp32"]
MEASURE = [f"train.eval_every_steps={EVAL_EVERY}", f"train.log_every={EVAL_EVERY}",
           "train.checkpoint_every_seconds=3600"]
SETTINGS = [  # (label, overrides): the paper's filter settings
    ("none", ["train.grokfast=none"]),
    ("ema (alpha 0.98, lamb 2)", ["train.grokfast=ema", "train.grokfast_alpha=0.98", "train.grokfast_lamb=2.0"]),
    ("ma (window 100, lamb 5)", ["train.grokfast=ma", "train.grokfast_window=100", "train.grokfast_lamb=5.0"]),
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


def read_row(label: str, run_dir: Path) -> GrokRow:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = next((r for r in records if r.get("val_answer_accuracy", 0.0) >= TARGET), None)
    final = records[-1]
    return GrokRow(label, final["step"], final["train_seconds"], reached and reached["step"],
                   reached and reached["train_seconds"], final["val_answer_accuracy"], final["val_bpb"])


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
        f"Each row trains the same model from the same seed on `{SPEC}` (byte tokens, loss on every byte of "
        "the packed stream, train fraction 0.5) for "
        f"{minutes:g} minutes of timed steps in its own process: the gpt preset with `{' '.join(GROKKING)}`. "
        f"Every {EVAL_EVERY} steps the whole val split (2,352 equations) is scored; an equation counts as right "
        f"when the argmax of both answer bytes is right. \"Reached\" is the first such eval at >= {TARGET:.0%}; "
        "seconds are timed training steps only (evaluation excluded). The last two columns are the final "
        "full-split eval. Steps are the measure; seconds depend on what else ran on the machine.",
        "",
        f"| Grokfast | val accuracy >= {TARGET:.0%} at step | at seconds | steps | steps/s | final val accuracy "
        "| final val bpb |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        reached = (f"{r.first_step:,}", f"{r.first_seconds:,.0f}") if r.first_step is not None else \
            (f"not within {r.steps:,} steps", "-")
        rate = r.steps / max(r.train_seconds, 1e-9)
        lines.append(f"| {r.label} | {reached[0]} | {reached[1]} | {r.steps:,} | {rate:.2f} "
                     f"| {r.val_accuracy:.2%} | {r.val_bpb:.4f} |")
    write_section(output, "## seedbed bench grokfast", "\n".join(lines) + "\n")
    print("\n".join(lines))
