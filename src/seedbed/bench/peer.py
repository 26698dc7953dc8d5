"""``seedbed bench peer``: PEER's time and counted FLOPs per token beside two MLPs, one process.

At d_model 128 and one batch of 4,096 tokens: PEER with 65,536, 262,144 and 1,048,576 experts
(4 heads of 8 experts, the paper's 8 x 16 scaled down to this width), an MLP of equal active
parameters (hidden width H k = 32, so 2 d H k weights, GELU like PEER's neurons) and the default
MLP (mult 4, relu^2). Each row times a no-grad forward and a forward + backward (input and
parameter gradients, gradients set to None before each, as a training step does), the median of
several repeats after warm-up, on the CPU threads torch was given.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from seedbed.bench.train import write_section
from seedbed.hardware import describe_machine
from seedbed.model.layers import BuildContext
from seedbed.model.peer import PEER  # noqa: F401  (registers "peer")
from seedbed.registry import FFNS

D_MODEL, TOKENS = 128, 4096
HEADS, TOP_K = 4, 8
WARMUP, REPEATS = 2, 7
ROWS: list[tuple[str, dict[str, Any]]] = [
    *[(f"PEER N={n:,}", {"kind": "peer", "n_experts": n, "heads": HEADS, "top_k": TOP_K})
      for n in (65_536, 262_144, 1_048_576)],
    (f"MLP, equal active (hidden {HEADS * TOP_K})",
     {"kind": "mlp", "mult": HEADS * TOP_K / D_MODEL, "activation": "gelu"}),
    (f"MLP, default (hidden {4 * D_MODEL})", {"kind": "mlp"}),
]


@dataclass
class Row:
    label: str
    params: int
    active_params: int
    forward_flops: float  # counted, per token
    training_flops: float  # counted forward + backward, per token
    forward_s: float  # median seconds of one call on TOKENS tokens
    training_s: float


def build(spec: dict[str, Any]) -> nn.Module:
    ctx = BuildContext(d_model=D_MODEL, n_layers=1, layer_index=0, max_seq_len=TOKENS,
                       linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})
    entry, options = FFNS.options(spec, "bench.peer")
    return entry.cls(options, ctx)


def median_seconds(run: Callable[[], None]) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(label: str, spec: dict[str, Any]) -> Row:
    torch.manual_seed(0)
    module = build(spec).train()
    x = torch.randn(1, TOKENS, D_MODEL)
    tokens = torch.zeros(1, TOKENS, dtype=torch.long)
    cotangent = torch.randn(1, TOKENS, D_MODEL)

    def forward() -> None:
        with torch.no_grad():
            module(x, tokens)

    def training() -> None:
        module.zero_grad(set_to_none=True)
        module(x.detach().requires_grad_(), tokens).backward(cotangent)

    params = sum(p.numel() for p in module.parameters())
    active = module.active_parameters() if isinstance(module, PEER) else params
    flops = module.flops(1, TOKENS)
    return Row(label, params, active, flops.forward / TOKENS, flops.training / TOKENS,
               median_seconds(forward), median_seconds(training))


def bench_peer(output: Path) -> None:
    rows = []
    for label, spec in ROWS:
        row = measure(label, spec)
        rows.append(row)
        print(f"{label}: forward {row.forward_s * 1e3:.1f} ms, forward + backward {row.training_s * 1e3:.1f} ms "
              f"per {TOKENS} tokens", flush=True)
    us = lambda seconds: seconds / TOKENS * 1e6
    lines = [
        "## seedbed bench peer",
        "",
        f"`seedbed bench peer` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. One feed-forward layer at "
        f"d_model {D_MODEL} on one batch of {TOKENS:,} tokens, fp32: PEER with {HEADS} heads of {TOP_K} experts "
        f"(key_dim 64, query norm, GELU), an MLP of equal active expert parameters (hidden {HEADS * TOP_K}: "
        f"2 d H k = {2 * D_MODEL * HEADS * TOP_K:,} weights) and the default MLP. Active parameters are those one "
        "token reads (PEER: query, all sub-keys, 2 d per retrieved expert). FLOPs are the counted matmul FLOPs "
        "per token (`flops()`; top-k, gathers and the dense table gradients are not matmuls and are not "
        f"counted). Times are the median of {REPEATS} calls after {WARMUP} warm-up calls, per token: a no-grad "
        "forward, and a forward + backward with input and parameter gradients (set to None before each); "
        "GFLOP/s is counted training FLOPs over that time.",
        "",
        "| feed-forward | params | active params | fwd MFLOPs/token | train MFLOPs/token | fwd us/token "
        "| fwd+bwd us/token | fwd+bwd GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.params:,} | {r.active_params:,} | {r.forward_flops / 1e6:.3f} "
                     f"| {r.training_flops / 1e6:.3f} | {us(r.forward_s):.2f} | {us(r.training_s):.2f} "
                     f"| {r.training_flops * TOKENS / r.training_s / 1e9:.1f} |")
    write_section(output, "## seedbed bench peer", "\n".join(lines) + "\n")
    print("\n".join(lines))
