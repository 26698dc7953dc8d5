"""``seedbed bench hybrid``: the layer-stack presets side by side at equal wall-clock.

gpt, mamba2, zamba, tiny and universal each train for the same minutes on the default
corpus in a fresh process (``bench.models.train_and_pack``: its max RSS is its own), are
packed with the default int8 rule, and the packed artifact is measured: val bpb at the
training context and at 4x it (does the model extrapolate?), batch-1 decode speed and
decode-state size after a prefill of 256 and of 4,096 tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from seedbed.bench.models import DECODE_CONTEXTS, train_and_pack
from seedbed.bench.train import write_section
from seedbed.config import resolve_config
from seedbed.hardware import describe_machine

HYBRID_PRESETS = ["gpt", "mamba2", "zamba", "tiny", "universal"]
LONG_CONTEXT_FACTOR = 4


def shape(preset: str) -> str:
    cfg = resolve_config(preset)
    m, plan = cfg.model, cfg.model.layer_plan()
    blocks = " ".join(f"{name}x{plan.count(name)}" for name in dict.fromkeys(plan))
    shared = [name for name in dict.fromkeys(plan) if m.block(name).share != "none"]
    return (f"{m.n_layers} layers ({blocks}), width {m.d_model}, ctx {m.max_seq_len}"
            + (f", shared: {', '.join(f'{n} ({m.block(n).share})' for n in shared)}" if shared else ""))


def bench_hybrid(minutes: float, output: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train_and_pack(preset, preset, [], minutes, Path(tmp), decode_contexts=DECODE_CONTEXTS,
                               long_context_factor=LONG_CONTEXT_FACTOR) for preset in HYBRID_PRESETS]
    short, long = DECODE_CONTEXTS
    lines = [
        "## seedbed bench hybrid",
        "",
        f"`seedbed bench hybrid --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Every preset trains for {minutes:g} minutes of timed steps on the default corpus (bytes) in its own "
        "process and is packed with the default int8 rule; bpb is the packed artifact on the whole val split "
        f"(296,270 bytes), at the preset's training context and at {LONG_CONTEXT_FACTOR}x it. Stored parameters "
        "are what the artifact holds; effective ones count each shared part once per use (what runs per token). "
        "Decoding is batch 1 on the artifact, median of 32 single-token steps after a prefill of the given "
        "context; state is the KV caches and recurrent states at that context. Peak memory is the max RSS of "
        "the row's process (train, pack, eval, decode).",
        "",
        f"| preset | shape | val bpb | val bpb at {LONG_CONTEXT_FACTOR}x ctx | artifact bytes | stored params "
        f"| effective params | train tokens/s | decode tok/s @{short} | decode tok/s @{long} | state @{short} "
        f"| state @{long} | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = min(r.packed_bpb for r in rows)
    for r in rows:
        (rate_short, state_short), (rate_long, state_long) = r.decode[short], r.decode[long]
        bpb = f"**{r.packed_bpb:.4f}**" if r.packed_bpb == best else f"{r.packed_bpb:.4f}"
        lines.append(f"| {r.label} | {shape(r.label)} | {bpb} | {r.long_context_bpb:.4f} | {r.artifact_bytes:,} "
                     f"| {r.stored_params:,} | {r.effective_params:,} | {r.train_tokens_per_second:,.0f} "
                     f"| {rate_short:,.0f} | {rate_long:,.0f} | {state_short / 2**10:,.0f} KiB "
                     f"| {state_long / 2**10:,.0f} KiB | {r.max_rss_mib:,.0f} |")
    write_section(output, "## seedbed bench hybrid", "\n".join(lines) + "\n")
    print("\n".join(lines))
