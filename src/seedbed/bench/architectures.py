"""``seedbed bench architectures``: the Architectures seed's parts side by side at equal wall-clock.

gpt, zamba, zamba with mixture of depths, with MoDE (staged), with PEER, and the
``architectures`` preset alone, with LayerSkip's training and with Grokfast (ema) each train
for the same minutes on the default corpus in a fresh process, are packed with the default
int8 rule, and the packed artifact is measured:

- val bpb at the training context, and on the split's first 65,536 tokens at 1x, 4x and 16x it
  (the seed's "long context window");
- stored and active parameters (``active_parameters``) and counted training FLOPs per token;
- training tokens/s, and batch-1 greedy decoding tokens/s, plain and self-speculative (LayerSkip,
  drafting with the first half of the layers), with the acceptance rate, after checking that both
  emit the same tokens;
- for routed blocks: the share of tokens the causal decision runs them on over the val split (the
  compute actually spent at inference) and how often it disagreed with top-k at the end of training.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seedbed.bench.models import in_fresh_process
from seedbed.bench.train import write_section
from seedbed.config import resolve_config
from seedbed.data import load_splits
from seedbed.hardware import describe_machine
from seedbed.model import LM, count_parameters
from seedbed.model.depths import DepthRouter
from seedbed.model.layerskip import DraftStats
from seedbed.model.moe import MoE
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.perf import training_flops_per_token
from seedbed.runs import load

# The shared attention block of zamba, routed (mixture of depths), then with an MoE feed-forward
# after the routing (staged MoDE), or with PEER as its feed-forward.
ROUTED = 'model.blocks.attn.mixture_of_depths={capacity=0.25}'
MOE = 'model.blocks.attn.ffn={kind="moe", n_routed=8, n_shared=1, top_k=2, expert_mult=0.5}'
PEER = 'model.blocks.attn.ffn={kind="peer", n_experts=65536, heads=4, top_k=8}'
LAYERSKIP = ["model.early_exit_loss=0.2", "model.layer_dropout=0.1"]
ROWS = [
    ("gpt", "gpt", []),
    ("zamba", "zamba", []),
    ("zamba + MoD", "zamba", [ROUTED]),
    ("zamba + MoDE", "zamba", [ROUTED, MOE]),
    ("zamba + PEER", "zamba", [PEER]),
    ("architectures", "architectures", []),
    ("architectures + LayerSkip", "architectures", LAYERSKIP),
    ("architectures + Grokfast", "architectures", ["train.grokfast=ema"]),  # alpha 0.98, lamb 2
]
CONTEXT_FACTORS = (4, 16)
LONG_CONTEXT_TOKENS = 65536  # the long-context columns score the val split's first tokens (at 1x too)
DECODE_TOKENS = 256


@dataclass
class ArchitectureRow:
    label: str
    packed_bpb: float
    long_bpb: dict[int, float]
    artifact_bytes: int
    stored_params: int
    active_params: float
    train_flops_per_token: float
    train_tokens_per_second: float
    tokens: int
    decode_tokens_per_second: float
    draft_tokens_per_second: float
    draft_layers: int
    acceptance: float
    same_text: bool
    picked_fraction: float | None
    disagreement: float | None
    max_rss_mib: float


def active_parameters(model: LM) -> float:
    """Parameters one token's forward reads, on average: the embedding (also the head), and for
    each depth its block's parameters (a shared part counted at every use), less the routed experts
    a token is not sent to (MoE: all but top_k of the experts and no-ops; PEER: all but the retrieved),
    times the block's capacity when it is routed. Approximate in one way: a shared block's per-use
    LoRA adapters are counted whole at each use."""
    total = sum(p.numel() for p in model.embed.parameters()) + sum(p.numel() for p in model.final_norm.parameters())
    if model.head is not None:
        total += sum(p.numel() for p in model.head.parameters())
    for layer in model.blocks:
        parts = [getattr(layer, name) for name in ("mixer", "ffn", "input_proj")]
        # A layer's own parameters, and the shared parts it uses (registered once, under LM.shared).
        modules = [layer] if layer.shared is None else [layer, layer.shared]
        router = layer.depth_router
        block = sum(p.numel() for m in modules for p in m.parameters())
        block -= 0 if router is None else sum(p.numel() for p in router.parameters())
        for part in parts:
            if isinstance(part, MoE):
                experts = sum(p.numel() for p in part.routed.parameters())
                block -= experts * (1 - part.top_k / part.n_choices)
            elif hasattr(part, "active_parameters"):
                block -= sum(p.numel() for p in part.parameters()) - part.active_parameters()
        if router is not None:
            block = block * router.capacity + sum(p.numel() for p in router.parameters())
        total += block
    return total


def picked_fraction(model: LM, tokens, context: int, windows: int = 64) -> float | None:
    """The share of tokens routed blocks run on in eval mode (the causal decision), over ``windows``
    windows of the split."""
    routers = [m for m in model.modules() if isinstance(m, DepthRouter)]
    if not routers:
        return None
    ids = torch.as_tensor(tokens[:windows * context].astype("int64")).view(-1, context)
    shares = []
    with torch.no_grad():
        for batch in ids.split(16):
            model(batch)
            shares.append(sum(float(r.picked_fraction) for r in routers) / len(routers))
    return sum(shares) / len(shares)


def timed_greedy(model: LM, prompt: list[int], **draft) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = list(model.generate(prompt, DECODE_TOKENS, temperature=0, **draft))
    return out, len(out) / (time.perf_counter() - start)


def _measure(label: str, preset: str, overrides: list[str], minutes: float, run_dir: Path, queue) -> None:
    from seedbed.train.trainer import Trainer

    try:
        cfg = resolve_config(preset, overrides=[*overrides, f"train.minutes={minutes}", "train.steps=0"])
        result = Trainer(cfg, run_dir, progress=True).run()
        loaded = load(run_dir)
        packed = pack_model(loaded, run_dir / "model.seedbed", QuantRule.parse("int8"))
        artifact = load_artifact(packed.path)
        model, context = artifact.model, cfg.model.max_seq_len
        spec = cfg.data.spec
        start = time.perf_counter()
        packed_bpb = artifact.evaluate_split(spec, "val").bpb
        long_bpb = {f: artifact.evaluate_split(spec, "val", max_tokens=LONG_CONTEXT_TOKENS, context=f * context).bpb
                    for f in (1, *CONTEXT_FACTORS)}
        print(f"[{label}] evaluated at 1x, {', '.join(f'{f}x' for f in CONTEXT_FACTORS)} the context in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        val_tokens = artifact.encode(b"".join(doc.data for doc in load_splits(spec)[1]))
        prompt = [int(t) for t in val_tokens[:context // 2]]
        plain, plain_rate = timed_greedy(model, prompt)
        draft_layers = max(1, cfg.model.n_layers // 2)
        stats = DraftStats()
        drafted, draft_rate = timed_greedy(model, prompt, draft_layers=draft_layers, draft_tokens=4, stats=stats)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        disagreement = next((r["mod_disagreement"] for r in reversed(records) if "mod_disagreement" in r), None)
        queue.put(ArchitectureRow(
            label, packed_bpb, long_bpb, packed.size, count_parameters(model), active_parameters(model),
            training_flops_per_token(model, context), result.tokens_per_second, result.tokens, plain_rate,
            draft_rate, draft_layers, stats.acceptance, plain == drafted, picked_fraction(model, val_tokens, context),
            disagreement, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[{label}] {type(error).__name__}: {error}"))


def bench_architectures(minutes: float, output: Path) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, overrides in ROWS:
            print(f"[{label}] training {preset} {' '.join(overrides)} for {minutes:g} min ...", file=sys.stderr)
            run_dir = Path(tmp) / label.replace(" ", "-").replace("+", "")
            rows.append(in_fresh_process(_measure, label, preset, overrides, minutes, run_dir))
    lines = [
        "## seedbed bench architectures",
        "",
        f"`seedbed bench architectures --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Every row trains for {minutes:g} minutes of timed steps on the default corpus (bytes) in its own process "
        "and is packed with the default int8 rule; bpb is the packed artifact on the whole val split (296,270 "
        f"bytes) at the training context, and on its first {LONG_CONTEXT_TOKENS:,} bytes at 1x, "
        f"{' and '.join(f'{f}x' for f in CONTEXT_FACTORS)} it. Rows: "
        f"`{ROUTED}` routes zamba's shared attention block (both uses); MoDE (staged) adds `{MOE}`; "
        f"PEER is `{PEER}`. Active parameters: what one token's "
        "forward reads on average (routed blocks at their capacity, the experts a token is sent to). Decoding: "
        f"batch-1 greedy, {DECODE_TOKENS} tokens after a half-context prompt from the val split, plain and "
        "self-speculative (LayerSkip: the first half of the layers draft 4 tokens, the whole model verifies "
        "them in one pass); 'same' checks the two emitted the same tokens. Picked: the share of tokens the "
        "routed blocks ran on at inference (their causal decision, 64 val windows); disagree: how often the "
        "causal decision differed from top-k in the last logged training step.",
        "",
        "| row | val bpb | 64k: 1x / 4x / 16x ctx | artifact bytes | stored params | active params "
        "| train MFLOPs/token | train tok/s | decode tok/s | self-spec. tok/s (speed-up, accepted, same) "
        "| picked / disagree | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = min(r.packed_bpb for r in rows)
    for r in rows:
        bpb = f"**{r.packed_bpb:.4f}**" if r.packed_bpb == best else f"{r.packed_bpb:.4f}"
        routed = "—" if r.picked_fraction is None else (
            f"{r.picked_fraction:.1%} / " + ("—" if r.disagreement is None else f"{r.disagreement:.1%}"))
        lines.append(
            f"| {r.label} | {bpb} | {' / '.join(f'{r.long_bpb[f]:.3f}' for f in (1, *CONTEXT_FACTORS))} "
            f"| {r.artifact_bytes:,} "
            f"| {r.stored_params:,} | {r.active_params:,.0f} | {r.train_flops_per_token / 1e6:.2f} "
            f"| {r.train_tokens_per_second:,.0f} | {r.decode_tokens_per_second:,.0f} "
            f"| {r.draft_tokens_per_second:,.0f} ({r.draft_tokens_per_second / r.decode_tokens_per_second:.2f}x, "
            f"{r.acceptance:.0%}, {'yes' if r.same_text else 'NO'}) | {routed} | {r.max_rss_mib:,.0f} |")
    write_section(output, "## seedbed bench architectures", "\n".join(lines) + "\n")
    print("\n".join(lines))
