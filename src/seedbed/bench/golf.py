"""``seedbed bench golf``: parameter golf done honestly, beside the best classic compressors.

Three models train for the same minutes, each in its own process, then are packed (int8; the
golf ones must fit parameter golf's 16,000,000 bytes): ``golf-gpt`` (dense), ``golf``
(golf-seeded with its preset's n-gram cache, orders 1..5 of SentencePiece tokens: what fits
16,000,000 bytes) and ``gpt`` with a byte-level cache of orders 1..8. Each packed
artifact is scored on the val and test splits: the model alone (``--no-cache``; for ``golf``
that is the golf-seeded row), the cache alone (its gate with the model's weight at zero), the
model mixed with the cache, and that mixture adapted score-first (``seedbed eval --adapt`` at
its defaults). Every row goes through ``check_normalised`` at every position. The val split
of the best row is then coded by ``seedbed compress --adapt`` and decoded back: the coded size
must agree with the evaluated bpb within 1% and the text must come back byte for byte.

The compressors get the training text the models saw: bits = size(train + val) - size(train),
per byte of val (and the same for test), with zpaq (``zpaq`` from PyPI, level 5 = zpaq -m5,
one thread), PPMd variant I order 8 with 256 MB (``pyppmd``) and xz -9e (``lzma``). A
compressor whose module is not installed is left out, and the table says so.
"""

from __future__ import annotations

import contextlib
import lzma
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from seedbed.adapt import AdaptOptions
from seedbed.bench.models import in_fresh_process
from seedbed.bench.train import write_section
from seedbed.hardware import describe_machine

ORDERS = 8
ADAPT = AdaptOptions()  # seedbed eval --adapt at its defaults
BUDGET = 16_000_000
MODELS = [  # (label, preset, overrides)
    ("golf-gpt (dense)", "golf-gpt", []),
    ("golf", "golf", []),
    ("gpt", "gpt", [f"cache.orders={ORDERS}"]),
]


@dataclass
class Trained:
    label: str
    run_dir: Path
    steps: int
    tokens_per_second: float
    train_seconds: float


@dataclass
class Row:
    label: str
    artifact_bytes: int | None
    tokens_per_second: float | None
    val: float
    test: float
    seconds: float  # scoring both splits
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    proof: str = ""
    compressors: list[Row] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _train(label: str, preset: str, overrides: list[str], minutes: float, run_dir: Path, queue) -> None:
    from seedbed.config import resolve_config
    from seedbed.train.trainer import Trainer

    try:
        # No periodic evals (half the wall-clock of the golf model's run): the packed artifact is scored after.
        cfg = resolve_config(preset, overrides=[*overrides, f"train.minutes={minutes}", "train.steps=0",
                                                "train.eval_every_seconds=1e9"])
        result = Trainer(cfg, run_dir, progress=True).run()
        queue.put(Trained(label, run_dir, result.steps, result.tokens_per_second, result.train_seconds))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[{label}] {type(error).__name__}: {error}"))


def split_text(name: str) -> bytes:
    from seedbed.data import load_splits

    train, val, test = load_splits("default")
    return b"".join(doc.data for doc in {"train": train, "val": val, "test": test}[name])


def score_rows(trained: Trained, artifact: Path, label_alone: str, with_cache: bool) -> list[Row]:
    """The rows of one packed model: alone, and with a cache the cache alone, mixed, and adapted."""
    from seedbed.cachemix import CacheMixer, TextCache
    from seedbed.pack.pack import load_artifact

    loaded = load_artifact(artifact)
    size = artifact.stat().st_size
    rows = []

    def row(label: str, note: str = "", **options) -> Row:
        start = time.perf_counter()
        scores = [loaded.evaluate_split("default", split, **options).bpb for split in ("val", "test")]
        print(f"  {label}: val {scores[0]:.4f} test {scores[1]:.4f}", file=sys.stderr)
        return Row(label, size, trained.tokens_per_second, *scores, time.perf_counter() - start, note)

    rows.append(row(label_alone, use_cache=False))
    if with_cache:
        trained_gate = loaded.cache
        weights = trained_gate.mixer.weights.clone()
        weights[0] = 0.0
        weights[0, 0] = -1e4  # the model's gate logit: its weight is exp(-1e4) = 0
        loaded.cache = TextCache(trained_gate.ngram, CacheMixer(weights))
        rows.append(row(f"{trained.label}: the cache alone", note="no model"))
        loaded.cache = trained_gate
        rows.append(row(f"{trained.label}: model + cache"))
        rows.append(row(f"{trained.label}: model + cache, adapted", adapt=ADAPT))
    return rows


def prove(artifact: Path, evaluated: float) -> str:
    """Compress and decompress the val split with the cache and adaptation: size and round trip,
    the size beside ``evaluated``, the bpb ``seedbed eval --adapt`` gave the same artifact and text."""
    from seedbed.codec import artifact_digest, compress_bytes, decompress_bytes
    from seedbed.pack.pack import load_artifact

    loaded = load_artifact(artifact)
    digest = artifact_digest(artifact)
    text = split_text("val")
    blob, encoded = compress_bytes(loaded, digest, text, adapt=ADAPT)
    restored, decoded = decompress_bytes(loaded, digest, blob)
    exact = "byte-exact" if restored == text else "NOT byte-exact"
    return (f"`seedbed compress --adapt` of the val split ({len(text):,} bytes) with the `{artifact.name}` artifact: "
            f"{len(blob):,} bytes = {encoded.bpb:.4f} bits per byte of payload (`seedbed eval --adapt`: "
            f"{evaluated:.4f}, {encoded.bpb / evaluated - 1:+.2%}); decompressed {exact}; encode "
            f"{encoded.seconds:.0f} s, decode {decoded.seconds:.0f} s.")


def compressor_rows(report: Report) -> None:
    train, val, test = (split_text(name) for name in ("train", "val", "test"))
    compressors = [("xz -9e (lzma, preset 9 extreme)", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))]
    try:
        import pyppmd

        compressors.append(("PPMd var. I, order 8, 256 MB (pyppmd)",
                            lambda b: pyppmd.compress(b, max_order=8, mem_size=256 << 20, variant="I")))
    except ImportError:
        report.missing.append("pyppmd")
    try:
        import zpaq

        compressors.append(("zpaq -m5 (zpaq, level 5, 1 thread)",
                            lambda b: zpaq.compress(b, level=5, threads=1, hints=False)))
    except ImportError:
        report.missing.append("zpaq")
    for label, compress in compressors:
        start = time.perf_counter()
        base = len(compress(train))
        scores = [8 * (len(compress(train + held)) - base) / len(held) for held in (val, test)]
        print(f"  {label}: val {scores[0]:.4f} test {scores[1]:.4f}", file=sys.stderr)
        report.compressors.append(Row(label, None, None, *scores, time.perf_counter() - start,
                                      "given the training text"))


def bench_golf(minutes: float, output: Path, keep: Path | None = None) -> None:
    """``keep``: a folder to keep the runs and packed artifacts in (a temporary one otherwise)."""
    report = Report()
    compressor_rows(report)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if keep is None else contextlib.nullcontext(str(keep)) as tmp:
        packed = {}
        for index, (label, preset, overrides) in enumerate(MODELS):
            print(f"[{label}] training the {preset} preset for {minutes:g} min ...", file=sys.stderr)
            trained = in_fresh_process(_train, label, preset, overrides, minutes, Path(tmp) / f"run{index}")
            artifact = Path(tmp) / f"{preset}.seedbed"
            pack(trained.run_dir, artifact, BUDGET if preset.startswith("golf") else None)
            packed[preset] = artifact
            alone = {"golf": "golf-seeded (no cache)", "gpt": "gpt (no cache)"}.get(preset, label)
            report.rows += score_rows(trained, artifact, alone, with_cache=preset != "golf-gpt")
        report.proof = prove(packed["gpt"], report.rows[-1].val)  # the last row: gpt with its cache, adapted
    write_report(report, minutes, output)


def pack(run_dir: Path, artifact: Path, budget: int | None) -> None:
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import pack_model
    from seedbed.runs import load

    pack_model(load(run_dir), artifact, QuantRule.parse("int8"), budget)


def golf_orders() -> int:
    from seedbed.config import resolve_config

    return resolve_config("golf").cache.orders


def write_report(report: Report, minutes: float, output: Path) -> None:
    lines = [
        "## seedbed bench golf",
        "",
        f"`seedbed bench golf --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Each model trained for {minutes:g} minutes in its own process on the default corpus, then packed int8 "
        f"(the golf ones under {BUDGET:,} bytes); the n-gram cache has orders 1..{golf_orders()} for golf "
        f"(SentencePiece tokens: what fits its budget) and 1..{ORDERS} for gpt (bytes), counted over the "
        "training split after training. bpb is `seedbed eval` of the packed artifact on the whole val and test "
        "splits, every position checked to sum to 1; \"adapted\" is `seedbed eval --adapt` at its defaults "
        f"(64 streams, an update every {ADAPT.every} positions: online cache counts, gate refit, one Adam step of "
        f"the model at lr {ADAPT.model_lr:g}). The compressors are given the training text: "
        "bits = size(train + held-out) - size(train).",
        "",
        "| row | val bpb | test bpb | artifact bytes | train tok/s | scoring s (both splits) | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report.rows + report.compressors:
        size = f"{r.artifact_bytes:,}" if r.artifact_bytes is not None else "-"
        speed = f"{r.tokens_per_second:,.0f}" if r.tokens_per_second is not None else "-"
        lines.append(f"| {r.label} | {r.val:.4f} | {r.test:.4f} | {size} | {speed} | {r.seconds:,.0f} | {r.note} |")
    if report.missing:
        lines += ["", f"Not installed, so not measured: {', '.join(report.missing)} (`pip install zpaq pyppmd`)."]
    lines += ["", report.proof]
    write_section(output, "## seedbed bench golf", "\n".join(lines) + "\n")
    print("\n".join(lines))
