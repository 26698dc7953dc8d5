"""``seedbed bench``: measurements run side by side in one process, written as a table.

``bench train`` measures, on this machine and in one run: the matmul peak in fp32 and
bf16, the default preset's training throughput and model-FLOPs utilisation in each
dtype, the val bpb after a fixed wall-clock budget, and classic compressors on the
same val text.
"""

from __future__ import annotations

import bz2
import lzma
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seedbed.config import resolve_config
from seedbed.data import load_dataset
from seedbed.fileio import atomic_write_text
from seedbed.model import LM
from seedbed.perf import measure_matmul_peak, training_flops_per_token
from seedbed.train.optim import build_optimizers


def compressed_bits(name: str, data: bytes) -> int | None:
    """Size in bits of ``data`` compressed by a classic tool (its CLI where installed)."""
    commands = {"xz -9e": ["xz", "-9e", "-c"], "bzip2 -9": ["bzip2", "-9", "-c"], "zstd -19": ["zstd", "-19", "-c", "-q"]}
    command = commands[name]
    if shutil.which(command[0]):
        return 8 * len(subprocess.run(command, input=data, capture_output=True, check=True).stdout)
    if name == "xz -9e":
        return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    if name == "bzip2 -9":
        return 8 * len(bz2.compress(data, 9))
    return None


def step_throughput(preset: str, dtype: torch.dtype | None, steps: int = 20, repeats: int = 3) -> tuple[float, float]:
    """Median tokens/s of training steps on random tokens, and the model FLOPs per token."""
    cfg = resolve_config(preset)
    torch.manual_seed(0)
    model = LM(cfg.model)
    optimizers = build_optimizers(model, cfg.train)
    batch, context = cfg.train.batch_size, cfg.model.max_seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, context + 1))

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch * context / (time.perf_counter() - start))
    return statistics.median(rates), training_flops_per_token(model, context)


def bench_train(minutes: float, output: Path, preset: str = "gpt") -> None:
    from seedbed.train.trainer import Trainer, pick_autocast

    device = torch.device("cpu")
    print(f"measuring matmul peaks and {preset} training throughput ...", file=sys.stderr)
    rows = []
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        peak = measure_matmul_peak(device, dtype or torch.float32, n=1024, seconds=2.0)
        tok_s, flops = step_throughput(preset, dtype)
        rows.append((label, peak, tok_s, tok_s * flops / peak))

    print(f"training {preset} for {minutes} minutes ...", file=sys.stderr)
    cfg = resolve_config(preset, overrides=[f"train.minutes={minutes}", "train.steps=0"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=True)
        result = trainer.run()
    trained_dtype = "bf16" if pick_autocast(cfg.train.dtype, device) else "fp32"

    data = load_dataset(cfg.data.spec, cfg.data.tokenizer, cfg.data.vocab_size)
    val_text = data.tokenizer.decode(data.val.tokens)
    compressors = {name: compressed_bits(name, val_text) for name in ("xz -9e", "bzip2 -9", "zstd -19")}

    lines = [
        "## seedbed bench train",
        "",
        f"`seedbed bench train --minutes {minutes:g}` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| dtype | measured matmul peak | {p} train tokens/s (median of 3) | model FLOPs utilisation |".format(p=preset),
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {label} | {peak / 1e9:,.0f} GFLOP/s | {tok_s:,.0f} | {mfu:.1%} |" for label, peak, tok_s, mfu in rows]
    lines += [
        "",
        f"| model or compressor | val bpb ({data.description.split(':')[0]} corpus, val split, {data.val.n_bytes:,} bytes) |",
        "| --- | ---: |",
        f"| seedbed {preset}, {minutes:g} min ({result.steps} steps, {result.tokens:,} tokens, {trained_dtype}) "
        f"| **{result.val_bpb:.4f}** |",
    ]
    for name, bits in compressors.items():
        lines.append(f"| {name} | {bits / data.val.n_bytes:.4f} |" if bits else f"| {name} | not installed |")
    write_section(output, "## seedbed bench train", "\n".join(lines) + "\n")
    print("\n".join(lines))


def bench_codec(artifact: Path, output: Path, streams: int = 64) -> None:
    """seedbed's coded size on the default test split beside classic compressors, with and without the model."""
    from seedbed.codec import artifact_digest, compress_bytes, decompress_bytes
    from seedbed.data import load_documents, split_documents
    from seedbed.runs import load

    loaded = load(artifact)
    _, _, test = split_documents(load_documents("default"))
    text = b"".join(doc.data for doc in test)
    digest = artifact_digest(artifact)
    print(f"compressing the default test split ({len(text):,} bytes) with {artifact} ...", file=sys.stderr)
    blob, enc = compress_bytes(loaded, digest, text, streams)
    restored, dec = decompress_bytes(loaded, digest, blob)
    if restored != text:
        raise RuntimeError("round trip failed")
    evaluated = loaded.evaluate(text)
    model_bytes = artifact.stat().st_size
    lines = [
        "## seedbed bench codec",
        "",
        f"`seedbed bench codec --artifact {artifact.name}` ({model_bytes:,}-byte artifact) on the default corpus's "
        f"test split ({len(text):,} bytes), {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}. "
        f"Round trip byte-exact. `seedbed eval` on the same text: {evaluated.bpb:.4f} bpb; the coded payload "
        f"is {enc.bpb / evaluated.bpb - 1:+.2%} from it.",
        "",
        "| compressor | bytes | bits per byte | bytes + model | bits per byte with model |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| seedbed compress ({enc.original_bytes / enc.seconds:,.0f} B/s encode, "
        f"{dec.original_bytes / dec.seconds:,.0f} B/s decode) | {len(blob):,} | {8 * len(blob) / len(text):.4f} "
        f"| {len(blob) + model_bytes:,} | {8 * (len(blob) + model_bytes) / len(text):.4f} |",
    ]
    for name in ("xz -9e", "bzip2 -9", "zstd -19"):
        bits = compressed_bits(name, text)
        lines.append(f"| {name} | {bits // 8:,} | {bits / len(text):.4f} | {bits // 8:,} | {bits / len(text):.4f} |"
                     if bits else f"| {name} | not installed | | | |")
    write_section(output, "## seedbed bench codec", "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the section that starts with ``heading`` (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `seedbed bench`; each section is one command's output.\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[end + 1:] if end != -1 else "")
    atomic_write_text(path, text)
