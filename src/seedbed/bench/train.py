"""``seedbed bench``: measurements run side by side in one process, written as a table.

``bench train`` measures, on this machine and in one run: the matmul peak of each dtype
the CPU runs fast (fp32, and bf16 only with bf16 units), then for each variant of the
default preset its training throughput and model-FLOPs utilisation, its val bpb after a
fixed wall-clock budget, and classic compressors on the same val text. Variants are how
the default preset is tuned: ``--variant 'name: key=value ...'``, repeated.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seedbed.config import RunConfig, resolve_config
from seedbed.data import load_dataset
from seedbed.fileio import atomic_write_text
from seedbed.model import LM
from seedbed.hardware import describe_machine, fast_bf16
from seedbed.perf import peak, training_flops_per_token
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


def step_throughput(cfg: RunConfig, dtype: torch.dtype | None, steps: int = 10, repeats: int = 3) -> tuple[float, float]:
    """Median tokens/s of whole training steps (forward, backward, optimisers) on random tokens,
    and the model's counted FLOPs per token."""
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

    for _ in range(2):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch * context / (time.perf_counter() - start))
    return statistics.median(rates), training_flops_per_token(model, context, batch)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name: key=value key=value"`` -> (name, overrides); a bare name is the preset unchanged."""
    name, _, overrides = text.partition(":")
    return name.strip(), overrides.split()


def shape(cfg: RunConfig) -> str:
    m, t = cfg.model, cfg.train
    return (f"{m.n_layers}x{m.d_model}, ctx {m.max_seq_len}, batch {t.batch_size}, {t.optimizer} "
            f"lr {t.lr:g}/{t.matrix_lr:g}, {t.schedule}")


def bench_train(minutes: float, output: Path, preset: str = "gpt", variants: list[str] | None = None) -> None:
    """Side by side in one process: the matmul peak of each fast dtype, then every variant of
    ``preset`` (overrides on top of it) timed on random tokens and trained for ``minutes``."""
    from seedbed.train.trainer import Trainer

    device = torch.device("cpu")
    command = f"seedbed bench train --minutes {minutes:g}" + "".join(f" --variant '{v}'" for v in variants or [])
    variants = [parse_variant(v) for v in (variants or [preset])]
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bf16(device) else [])
    print(f"measuring matmul peaks and the throughput of {len(variants)} variant(s) ...", file=sys.stderr)
    peaks = {label: peak(device, dtype) for label, dtype in dtypes}
    trained_label = dtypes[-1][0]  # what dtype=auto trains in here
    rows = []
    for name, overrides in variants:
        cfg = resolve_config(preset, overrides=overrides + [f"train.minutes={minutes}", "train.steps=0"])
        tok_s, flops = step_throughput(cfg, dict(dtypes)[trained_label] if trained_label == "bf16" else None)
        rows.append({"name": name, "cfg": cfg, "tok_s": tok_s, "mfu": tok_s * flops / peaks[trained_label].flops,
                     "params": sum(p.numel() for p in LM(cfg.model).parameters())})
    for row in rows:
        print(f"training {row['name']} for {minutes:g} minutes ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            row["result"] = Trainer(row["cfg"], Path(tmp) / "run", progress=True).run()

    cfg = rows[0]["cfg"]
    data = load_dataset(cfg.data.spec, cfg.data.tokenizer, cfg.data.vocab_size)
    val_text = data.tokenizer.decode(data.val.tokens)
    compressors = {name: compressed_bits(name, val_text) for name in ("xz -9e", "bzip2 -9", "zstd -19")}

    lines = [
        "## seedbed bench train",
        "",
        f"`{command}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| dtype | matmul peak | source |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {label} | {p.flops / 1e9:,.0f} GFLOP/s | {p.source} |" for label, p in peaks.items()]
    if not fast_bf16(device):
        lines.append("| bf16 | not run | no avx512_bf16 / amx_bf16: emulated, about 10x slower than fp32 |")
    lines += [
        "",
        f"Every variant trains {preset} in {trained_label} for {minutes:g} minutes of timed steps (warm-up excluded) "
        f"and is scored on the whole val split ({data.val.n_bytes:,} bytes of the {data.description.split(':')[0]} "
        f"corpus). Step tokens/s: median of 3 x 10 whole training steps on random tokens; MFU over the {trained_label} peak.",
        "",
        "| variant | shape | params | step tokens/s | step MFU | steps | tokens | train tokens/s | val bpb |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = min(row["result"].val_bpb for row in rows)
    for row in rows:
        result = row["result"]
        bpb = f"**{result.val_bpb:.4f}**" if result.val_bpb == best else f"{result.val_bpb:.4f}"
        lines.append(f"| {row['name']} | {shape(row['cfg'])} | {row['params']:,} | {row['tok_s']:,.0f} | {row['mfu']:.1%} "
                     f"| {result.steps} | {result.tokens:,} | {result.tokens_per_second:,.0f} | {bpb} |")
    lines += ["", "| classic compressor | val bpb |", "| --- | ---: |"]
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
        f"test split ({len(text):,} bytes), on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
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
