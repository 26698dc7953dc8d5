"""``seedbed bench hourglass``: efficient_transformer_v1's hypotheses at equal wall-clock.

The flat gpt preset beside the ``hourglass`` preset taken apart: the perceiver compression
with each upsampling, then the group encoder's last K outputs, then multi-channel latent
blocks (three merges), then Denseformer averages (the preset itself), and one channel over
a twice longer latent sequence (does a second channel beat a longer sequence?). Every row trains for the same minutes on the
default corpus in a fresh process (``bench.models.train_and_pack``) and is packed with the
default int8 rule; bpb, decode speed and state are the packed artifact's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from seedbed.bench.models import train_and_pack
from seedbed.bench.train import write_section
from seedbed.hardware import describe_machine

VALLEY = "model.blocks.valley.mixer"
ONE_CHANNEL = ['model.blocks.latent.mixer={kind="attention", n_heads=2}', 'model.blocks.latent.ffn={kind="mlp"}']
NO_DENSEFORMER = [f"{VALLEY}.denseformer={{}}"]
PERCEIVER, REPLICATE = [f"{VALLEY}.compress=perceiver"], [f"{VALLEY}.upsample=replicate"]
ROWS = [  # (label, preset, overrides): one change from the row above, but for the first hourglass
    ("gpt (flat)", "gpt", []),
    ("hourglass: perceiver, replicate", "hourglass", PERCEIVER + REPLICATE + ONE_CHANNEL + NO_DENSEFORMER),
    ("hourglass: perceiver, attention up", "hourglass", PERCEIVER + ONE_CHANNEL + NO_DENSEFORMER),
    ("hourglass: last-K, attention up", "hourglass", ONE_CHANNEL + NO_DENSEFORMER),
    ("+ multi-channel (softmax merge)", "hourglass", NO_DENSEFORMER),
    ("+ multi-channel, mean merge", "hourglass", NO_DENSEFORMER + ["model.blocks.latent.mixer.merge=mean"]),
    ("+ multi-channel, max merge", "hourglass", NO_DENSEFORMER + ["model.blocks.latent.mixer.merge=max"]),
    ("+ Denseformer = hourglass preset", "hourglass", []),
    ("one channel, 4 latents per group", "hourglass", ONE_CHANNEL + NO_DENSEFORMER + [f"{VALLEY}.latents=4"]),
]
DECODE_CONTEXT = 96  # prefill, then 32 single steps: within the 128-byte training context


def bench_hourglass(minutes: float, output: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train_and_pack(label, preset, overrides, minutes, Path(tmp), decode_contexts=[DECODE_CONTEXT])
                for label, preset, overrides in ROWS]
    lines = [
        "## seedbed bench hourglass",
        "",
        f"`seedbed bench hourglass --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Every row trains for {minutes:g} minutes of timed steps on the default corpus (bytes, context 128) in its "
        "own process and is packed with the default int8 rule; bpb is the packed artifact on the whole val split. "
        "The hourglass rows are the `hourglass` preset (a byte layer, groups of 8 bytes -> 2 latents, local/global "
        "latent layers around four latent blocks, a byte layer) with the overrides in `bench/hourglass.py`. "
        "FLOPs are counted training FLOPs (forward + backward) per token at context 128. Decoding is batch 1 on the "
        f"artifact, median of 32 single-byte steps after a {DECODE_CONTEXT}-byte prefill; peak memory is the max "
        "RSS of the row's process (train, pack, eval, decode).",
        "",
        "| model | val bpb | artifact bytes | params | train MFLOPs/token | train tokens/s | trained tokens "
        f"| decode tok/s @{DECODE_CONTEXT} | state @{DECODE_CONTEXT} | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = min(r.packed_bpb for r in rows)
    for r in rows:
        rate, state = r.decode[DECODE_CONTEXT]
        bpb = f"**{r.packed_bpb:.4f}**" if r.packed_bpb == best else f"{r.packed_bpb:.4f}"
        lines.append(f"| {r.label} | {bpb} | {r.artifact_bytes:,} | {r.stored_params:,} "
                     f"| {r.train_flops_per_token / 1e6:.2f} | {r.train_tokens_per_second:,.0f} | {r.tokens:,} "
                     f"| {rate:,.0f} | {state / 2**10:,.0f} KiB | {r.max_rss_mib:,.0f} |")
    write_section(output, "## seedbed bench hourglass", "\n".join(lines) + "\n")
    print("\n".join(lines))
