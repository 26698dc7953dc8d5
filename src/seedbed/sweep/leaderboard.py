"""``seedbed leaderboard SWEEP``: a sweep's trials as tables, and its Pareto fronts as plots.

Three numbers per trial: the packed model's val bpb, the artifact's bytes, the wall-clock
seconds of training and packing. Tables: every finished trial sorted by bpb; each
configuration over its seeds (mean, sample standard deviation, min and max of val bpb);
the trials that failed, with their reasons.

A trial is on the Pareto front of (x, bpb) when no other trial is at least as good in both
and better in one (x is bytes or seconds, both minimised)::

    p dominated  <=>  exists q: q.x <= p.x and q.bpb <= p.bpb and (q.x < p.x or q.bpb < p.bpb)

The plots (``pareto-bytes.png``, ``pareto-time.png`` in the sweep folder) show every
trial, the front joined as a staircase, and the front's configurations named.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from seedbed.errors import UserError
from seedbed.fileio import atomic_write_text

SWEEP_RECORD = "sweep.json"  # the study's name and storage, written by seedbed sweep
AXES = {"bytes": ("artifact_bytes", "artifact bytes"), "time": ("wall_seconds", "wall-clock seconds (train + pack)")}


@dataclass
class Row:
    number: int
    key: str
    config: str
    seed: int
    outcome: str
    val_bpb: float | None = None
    artifact_bytes: int | None = None
    wall_seconds: float | None = None
    tokens_per_second: float | None = None
    steps: int | None = None
    machine: str = ""
    error: str = ""


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates minimised), by x then y."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(qx <= x and qy <= y and (qx < x or qy < y) for qx, qy in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def read_rows(folder: Path, url: str | None = None) -> tuple[str, list[Row]]:
    """The study's name and one row per trial that ran or was meant to (duplicates and stale
    attempts left out: they never produced a result)."""
    import optuna

    from seedbed.sweep.runner import DUPLICATE, storage_url

    record_path = folder / SWEEP_RECORD
    if not record_path.is_file():
        raise UserError(f"{folder} is not a sweep folder (no {SWEEP_RECORD}; make one with seedbed sweep FILE --out DIR)")
    try:
        record = json.loads(record_path.read_text())
        name = record["study"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{record_path} is damaged: it must hold the study's name") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(folder, url or record.get("storage"))
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except Exception as err:
        raise UserError(f"cannot read study {name!r} from {url}: {str(err).splitlines()[0]}") from None
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        outcome = attrs.get("outcome", "") if trial.state.is_finished() else trial.state.name.lower()
        if outcome in (DUPLICATE, "") or "key" not in attrs:
            continue
        rows.append(Row(trial.number, attrs["key"], attrs.get("config", ""), attrs.get("seed", 0), outcome,
                        trial.value if outcome == "complete" else None, attrs.get("artifact_bytes"),
                        attrs.get("wall_seconds"), attrs.get("tokens_per_second"), attrs.get("steps"),
                        attrs.get("machine", ""), attrs.get("error", "")))
    return name, rows


def trial_lines(rows: list[Row]) -> list[str]:
    done = sorted((r for r in rows if r.outcome == "complete"), key=lambda r: (r.val_bpb, r.number))
    lines = ["| rank | trial | val bpb (packed) | artifact bytes | wall s | train tokens/s | steps |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for rank, row in enumerate(done, 1):
        lines.append(f"| {rank} | {row.key} | {row.val_bpb:.4f} | {row.artifact_bytes:,} | {row.wall_seconds:,.0f} | "
                     f"{row.tokens_per_second or 0:,.0f} | {row.steps or 0:,} |")
    return lines


def config_lines(rows: list[Row]) -> list[str]:
    """Each configuration over its seeds: n, mean and spread of val bpb, mean bytes and time."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.outcome == "complete":
            groups.setdefault(row.config, []).append(row)
    lines = ["| configuration | seeds | val bpb mean | std | min | max | artifact bytes | wall s | train tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for config, members in sorted(groups.items(), key=lambda item: statistics.fmean(r.val_bpb for r in item[1])):
        bpb = [r.val_bpb for r in members]
        spread = f"{statistics.stdev(bpb):.4f}" if len(bpb) > 1 else "-"
        lines.append(f"| {config} | {len(bpb)} | {statistics.fmean(bpb):.4f} | {spread} | {min(bpb):.4f} | "
                     f"{max(bpb):.4f} | {statistics.fmean(r.artifact_bytes for r in members):,.0f} | "
                     f"{statistics.fmean(r.wall_seconds for r in members):,.0f} | "
                     f"{statistics.fmean(r.tokens_per_second or 0 for r in members):,.0f} |")
    return lines


def other_lines(rows: list[Row]) -> list[str]:
    """Trials without a result: failed (with why), pruned, or still running."""
    return [f"- {row.key}: {row.outcome}" + (f": {row.error}" if row.error else "")
            for row in sorted(rows, key=lambda r: r.number) if row.outcome != "complete"]


def plot_pareto(rows: list[Row], axis: str, path: Path) -> None:
    from seedbed.plot import save_png  # first: it selects matplotlib's file-only backend

    import matplotlib.pyplot as plt

    attr, label = AXES[axis]
    done = [r for r in rows if r.outcome == "complete"]
    points = [(float(getattr(r, attr)), r.val_bpb) for r in done]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color="tab:gray", label="trials")
    if front:
        xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(xs, ys, where="post", color="tab:red", linewidth=1)
        ax.scatter(xs, ys, s=24, color="tab:red", label="Pareto front", zorder=3)
        for i in front:
            ax.annotate(done[i].config, points[i], textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("val bpb (packed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def leaderboard(folder: Path, url: str | None = None, markdown: Path | None = None) -> str:
    """The tables as text (also written to ``markdown`` if given); the plots into the folder."""
    name, rows = read_rows(folder, url)
    machines = sorted({r.machine for r in rows if r.machine})
    parts = [f"# Sweep {name}", "", f"Machine: {'; '.join(machines) or 'no finished trial'}", "",
             "## Configurations over seeds", "", *config_lines(rows), "", "## Trials by val bpb", "", *trial_lines(rows)]
    others = other_lines(rows)
    if others:
        parts += ["", "## Trials without a result", "", *others]
    for axis in AXES:
        path = folder / f"pareto-{axis}.png"
        plot_pareto(rows, axis, path)
        link = os.path.relpath(path, markdown.parent if markdown is not None else Path.cwd())
        parts += ["", f"![val bpb against {AXES[axis][1]}]({link})"]
    text = "\n".join(parts) + "\n"
    if markdown is not None:
        atomic_write_text(markdown, text)
    return text
