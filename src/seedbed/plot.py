"""The loss / bpb curve of a run, drawn from its metrics.jsonl (with val answer accuracy on a
second axis for ``modular:P`` runs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seedbed.fileio import atomic_write_bytes  # noqa: E402


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_bpb"]) for r in records if "train_bpb" in r]
    val = [(r["step"], r.get("val_bpb", r.get("val_bpb_partial"))) for r in records
           if "val_bpb" in r or "val_bpb_partial" in r]
    accuracy = [(r["step"], r["val_answer_accuracy"]) for r in records if "val_answer_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train (bits per byte)", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val bpb", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if accuracy:
        right = ax.twinx()
        right.plot(*zip(*accuracy), "s-", color="tab:green", label="val answer accuracy", markersize=2)
        right.set_ylabel("val answer accuracy")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    fig.tight_layout()
    save_png(fig, out_path)


def save_png(fig, path: Path) -> None:
    """Write a figure as PNG atomically (a crash leaves the old plot or none), and free it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
