"""``seedbed bench seeds`` and ``seedbed bench mixkabrn``: train several models for the same
wall-clock budget from one command, pack each, and write one table.

Every row is measured the same way, in a fresh process (so its max RSS is its own):
``Trainer`` for ``minutes`` of training time (the final val bpb is the full fp32 eval),
then ``pack`` with the default int8 rule, then the packed artifact is evaluated again on
the whole val split, so the table's bytes and bpb belong to the same file.

The streaming row builds the 10-billion-virtual-parameter preset in a fresh process (so
its max RSS is its own), packs it, loads the artifact back and times a forward pass and
a training step; it is a memory and speed demonstration, not trained to convergence.
"""

from __future__ import annotations

import json
import multiprocessing
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seedbed.bench.train import write_section
from seedbed.config import resolve_config
from seedbed.hardware import describe_machine
from seedbed.model import LM, count_parameters, effective_parameters, virtual_parameters
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.perf import training_flops_per_token
from seedbed.runs import load


@dataclass
class ModelRow:
    label: str
    val_bpb: float  # the trained model, full val split, fp32
    packed_bpb: float  # the packed artifact, full val split
    artifact_bytes: int
    stored_params: int
    virtual_params: int
    train_tokens_per_second: float
    steps: int
    tokens: int
    max_rss_mib: float  # the whole process: training, packing and evaluation
    # context -> (decode tokens/s at batch 1, bytes of decoding state), measured on the artifact
    decode: dict[int, tuple[float, int]] = field(default_factory=dict)
    seed_search: tuple[int, int] = (0, 0)  # (accepted, rounds) of the gradient-free seed search, if it ran
    effective_params: int = 0  # shared parts counted once per use
    long_context_bpb: float | None = None  # the packed artifact, val split, at long_context_factor x its context
    train_flops_per_token: float = 0.0  # counted (perf.training_flops_per_token) at the training context


def state_bytes(state) -> int:
    """Bytes of the tensors in a decode state, however its layers nest them (lists, dicts)."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def decode_speed(model: LM, context: int, steps: int = 32) -> tuple[float, int]:
    """Median single-token decode rate after a ``context``-token prefill, and the state's size."""
    state = model.init_state(1, context + steps)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    token = prompt[:, -1:]
    times = []
    with torch.no_grad():
        _, state = model.step(prompt, state)
        for _ in range(steps):
            start = time.perf_counter()
            _, state = model.step(token, state)
            times.append(time.perf_counter() - start)
    return 1 / statistics.median(times), state_bytes(state)


def in_fresh_process(function, *args):
    """Run ``function(*args, queue)`` in a spawned process and return what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=function, args=(*args, queue))
    child.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{function.__name__} died (exit code {child.exitcode})") from None
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _train_and_pack(label: str, preset: str, overrides: list[str], minutes: float, run_dir: Path, quant: str,
                    decode_contexts: list[int], long_context_factor: int, queue) -> None:
    from seedbed.train.trainer import Trainer

    try:
        cfg = resolve_config(preset, overrides=[*overrides, f"train.minutes={minutes}", "train.steps=0"])
        result = Trainer(cfg, run_dir, progress=True).run()
        loaded = load(run_dir)
        packed = pack_model(loaded, run_dir / "model.seedbed", QuantRule.parse(quant))
        artifact = load_artifact(packed.path)
        packed_bpb = artifact.evaluate_split(cfg.data.spec, "val").bpb
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        decode = {context: decode_speed(artifact.model, context) for context in decode_contexts}
        long_bpb = (artifact.evaluate_split(cfg.data.spec, "val", context=long_context_factor * cfg.model.max_seq_len).bpb
                    if long_context_factor else None)
        rounds = [record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if "seed_search" in record]
        queue.put(ModelRow(label, result.val_bpb, packed_bpb, packed.size, count_parameters(loaded.model),
                           virtual_parameters(loaded.model), result.tokens_per_second, result.steps, result.tokens,
                           rss, decode, (sum(record["accepted"] for record in rounds), len(rounds)),
                           effective_parameters(loaded.model), long_bpb,
                           training_flops_per_token(loaded.model, cfg.model.max_seq_len)))
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[{label}] {type(error).__name__}: {error}"))


def train_and_pack(label: str, preset: str, overrides: list[str], minutes: float, workdir: Path,
                   quant: str = "int8", decode_contexts: list[int] | None = None,
                   long_context_factor: int = 0) -> ModelRow:
    print(f"[{label}] training {preset} {' '.join(overrides)} for {minutes:g} min ...", file=sys.stderr)
    run_dir = workdir / label.replace(" ", "-").replace("+", "-")
    return in_fresh_process(_train_and_pack, label, preset, overrides, minutes, run_dir, quant, decode_contexts or [],
                            long_context_factor)


def generation_milliseconds(preset: str, overrides: list[str]) -> float:
    """Time to grow every generated tensor of the model once from its seeds (what a cache miss costs)."""
    from seedbed.model.seeded import SeedCache

    torch.manual_seed(0)
    model = LM(resolve_config(preset, overrides=overrides).model)
    caches = [m for m in model.modules() if isinstance(m, SeedCache)]
    if not caches:
        return 0.0
    start = time.perf_counter()
    for module in caches:
        module._build(module.build_factors if getattr(module, "factored", False) else module.build,
                      tuple(module.seeds.tolist()))
    return 1000 * (time.perf_counter() - start)


def _measure_streaming(preset: str, context: int, out_dir: str, queue) -> None:
    """In a fresh process: build, pack, reload, then time a forward pass and a training step."""
    from seedbed.data.tokenizer import ByteTokenizer
    from seedbed.loaded import LoadedModel

    cfg = resolve_config(preset)
    torch.manual_seed(0)
    model = LM(cfg.model)
    packed = pack_model(LoadedModel(model, cfg, ByteTokenizer(), Path(out_dir)), Path(out_dir) / "model.seedbed",
                        QuantRule.parse("int8"))
    del model
    model = load_artifact(packed.path).model
    tokens = torch.randint(0, cfg.model.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = time.perf_counter()
        model(tokens[:, :-1])
        forward_s = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    train_s = time.perf_counter() - start
    queue.put({"virtual": virtual_parameters(model), "stored": count_parameters(model), "bytes": packed.size,
               "forward_s_per_token": forward_s / context, "train_s_per_token": train_s / context,
               "loss": loss.item(), "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def streaming_row(preset: str = "germinator-10b", context: int = 256) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return in_fresh_process(_measure_streaming, preset, context, tmp)


SEARCH_EVERY, SEARCH_CANDIDATES = 10, 4  # the seed-search row's settings, also quoted under the table
# The germinator and mixkabrn presets' shape: the gpt rows beside them are pinned to it, so a
# change of the default preset does not change what these tables compare.
SHARED_SHAPE = ["model.d_model=256", "model.n_layers=6", "model.max_seq_len=256", "model.mixer.n_heads=4",
                "train.batch_size=16"]
SEED_MODELS = [
    ("dense", "gpt", SHARED_SHAPE),
    ("seeded", "gpt", SHARED_SHAPE + ['model.linear={kind="seeded", rank=32, keep=0.75}']),
    ("orthogonal-lora", "gpt", SHARED_SHAPE + ['model.linear={kind="orthogonal-lora", rank=64}']),
    ("gaussian-lora", "gpt", SHARED_SHAPE + ['model.linear={kind="gaussian-lora", rank=64}']),
    ("germinator", "germinator", []),
    # The same model and bytes with the gradient-free seed search interleaved (train/seed_search.py:
    # picked on one batch, accepted on another).
    ("germinator + seed search", "germinator",
     [f"train.seed_search_every={SEARCH_EVERY}", f"train.seed_search_candidates={SEARCH_CANDIDATES}"]),
]


def bench_seeds(minutes: float, output: Path, stream_preset: str = "germinator-10b") -> None:
    rows, generation = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset, overrides in SEED_MODELS:
            rows.append(train_and_pack(label, preset, overrides, minutes, Path(tmp)))
            generation[label] = generation_milliseconds(preset, overrides)
    print(f"[streaming] {stream_preset} forward and training step in a fresh process ...", file=sys.stderr)
    stream = streaming_row(stream_preset)
    dense_speed = rows[0].train_tokens_per_second
    lines = [
        "## seedbed bench seeds",
        "",
        f"`seedbed bench seeds --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Every model trains for {minutes:g} minutes on the default corpus (gpt shape: 6 layers, width 256, "
        "context 256, bytes) and is packed with the default int8 rule; val bpb is the full val split "
        "(296,270 bytes), before and after packing. Generation is the time to grow all of a model's "
        "seeded tensors once, and that time as a share of the row's mean training step: what regenerating "
        "every step would cost. Generated weights are cached until a seed changes, so a training step "
        "regenerates nothing (the seed search's accepted proposals excepted); the tokens/s ratio to dense "
        "is the whole measured overhead of generated weights.",
        "",
        "| model | val bpb | packed val bpb | artifact bytes | stored params | virtual params "
        "| train tokens/s (vs dense) | generation ms (share of a step) | max RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        step_ms = 1000 * r.tokens / r.steps / r.train_tokens_per_second
        lines.append(f"| {r.label} | {r.val_bpb:.4f} | {r.packed_bpb:.4f} | {r.artifact_bytes:,} | "
                     f"{r.stored_params:,} | {r.virtual_params:,} | {r.train_tokens_per_second:,.0f} "
                     f"({r.train_tokens_per_second / dense_speed:.2f}x) | {generation[r.label]:.0f} "
                     f"({generation[r.label] / step_ms:.0%}) | {r.max_rss_mib:,.0f} |")
    lines += [
        f"| {stream_preset} (layer streaming, untrained) | — | — | {stream['bytes']:,} | {stream['stored']:,} | "
        f"{stream['virtual']:,} | {1 / stream['train_s_per_token']:,.1f} | — | {stream['max_rss_mib']:,.0f} |",
        "",
        f"Streaming row: `{stream_preset}` built, packed, loaded back from its artifact and run in a fresh "
        f"process at context 256, fp32: forward {stream['forward_s_per_token']:.4f} s/token, training step "
        f"(forward, backward with regeneration, AdamW) {stream['train_s_per_token']:.4f} s/token, "
        f"max RSS {stream['max_rss_mib']:,.0f} MiB.",
    ]
    lines += [f"Seed search in `{r.label}`: every {SEARCH_EVERY} steps, {SEARCH_CANDIDATES} one-seed proposals "
              "ranked on a fresh batch, the best kept only if it beats the current seeds on a second, "
              "independent batch by two standard errors of the per-sequence difference; "
              f"{r.seed_search[0]} of {r.seed_search[1]} rounds accepted a proposal."
              for r in rows if r.seed_search[1]]
    write_section(output, "## seedbed bench seeds", "\n".join(lines) + "\n")
    print("\n".join(lines))


MIXKABRN_MODELS = [
    ("gpt", "gpt", SHARED_SHAPE),
    ("gpt+bitlinear", "gpt", SHARED_SHAPE + ['model.linear={kind="bitlinear"}']),
    ("gpt+kan", "gpt", SHARED_SHAPE + ['model.ffn={kind="kan", basis="rbf"}']),
    ("retention", "gpt", SHARED_SHAPE + ['model.mixer={kind="retention", n_heads=4}']),
    ("moe", "gpt", SHARED_SHAPE + ['model.ffn={kind="moe"}']),
    ("mixkabrn", "mixkabrn", []),
]
DECODE_CONTEXTS = [256, 4096]
KERNEL_SHAPES = [(256, 1024), (512, 1536), (1024, 4096), (2048, 8192)]
FFN_TOKENS = 4096


def ffn_speed_rows(d_model: int = 256, tokens: int = FFN_TOKENS, repeats: int = 7) -> list[tuple[str, int, int, float]]:
    """KAN beside an MLP of (about) equal parameters: params, forward FLOPs/token, median fwd+bwd ms."""
    from seedbed.model.kan import KAN, flops_per_token
    from seedbed.model.layers import BuildContext
    from seedbed.model.mlp import MLP

    ctx = BuildContext(d_model, 1, 0, 256, {"kind": "dense"}, {"kind": "rmsnorm"})
    torch.manual_seed(0)
    layers = {"mlp (mult 4, relu2)": (MLP(MLP.Options(), ctx), 2 * 2 * 4 * d_model * d_model)}
    for basis in ("bspline", "rbf"):
        options = KAN.Options(basis=basis)
        layers[f"kan {basis} (matched params)"] = (KAN(options, ctx), flops_per_token(d_model, options))
    # KANbeFair's other comparison: an MLP given the KAN's forward FLOPs, basis work included.
    kan_flops = flops_per_token(d_model, KAN.Options(basis="rbf"))
    mult = kan_flops / (2 * 2 * d_model * d_model)
    layers[f"mlp (mult {mult:.2f}: rbf kan's FLOPs)"] = (MLP(MLP.Options(mult=mult), ctx),
                                                        2 * 2 * round(mult * d_model) * d_model)
    x = torch.randn(tokens, d_model)
    ids = torch.zeros(tokens, dtype=torch.long)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):  # interleaved, so load drifts hit every layer alike
        for name, (layer, _) in layers.items():
            start = time.perf_counter()
            layer(x.requires_grad_(), ids).square().mean().backward()
            times[name].append(time.perf_counter() - start)
    return [(name, count_parameters(layer), flops, 1000 * statistics.median(times[name]))
            for name, (layer, flops) in layers.items()]


PHASES = ("train", "pack", "eval", "generate")


def phase_peaks(preset: str, minutes: float, workdir: Path) -> tuple[dict[str, float], Path]:
    """Train, pack, evaluate and sample ``preset`` through the CLI, each phase in a process of its own:
    the peak RSS (MiB) of each, and the artifact."""
    from seedbed.bench.memory import run_measured

    run, artifact = workdir / f"{preset}-phases", workdir / f"{preset}-phases.seedbed"
    commands = {"train": ["train", "--preset", preset, "--minutes", str(minutes), "--out", str(run), "--no-progress"],
                "pack": ["pack", str(run), "-o", str(artifact)],
                "eval": ["eval", str(artifact)],
                "generate": ["generate", str(artifact), "--prompt", "KING.", "--tokens", "200", "--seed", "1"]}
    peaks = {}
    for phase in PHASES:
        print(f"[{preset} {phase}] in its own process ...", file=sys.stderr)
        measured = run_measured(commands[phase])
        if measured.returncode != 0:
            raise RuntimeError(f"seedbed {phase} failed: {measured.stderr.strip().splitlines()[-1:]}")
        peaks[phase] = measured.peak_mib
    return peaks, artifact


def kernel_decode_rows(artifact: Path) -> dict[str, dict[int, float]]:
    """Decode tokens/s at batch 1 of one artifact on each BitLinear kernel this machine runs."""
    from seedbed.model.bitlinear import available_kernels, use_kernel

    model = load_artifact(artifact).model
    rows = {}
    for kernel in available_kernels():
        use_kernel(model, kernel)
        rows[kernel] = {context: decode_speed(model, context)[0] for context in DECODE_CONTEXTS}
    use_kernel(model, None)
    return rows


def microseconds(row: dict, key: str) -> str:
    """A timing cell; candidates the CPU cannot run natively are not timed."""
    return f"{row[key]:.1f}" if key in row else "not run"


PRESET_BUDGETS = (4.0, 10.0)  # minutes: the "at 4 and 10 minutes beside gpt"


def preset_rows(workdir: Path) -> list[tuple[float, ModelRow, ModelRow]]:
    """(minutes, gpt, mixkabrn): both presets as shipped, trained side by side for each budget, packed."""
    return [(minutes, train_and_pack(f"gpt {minutes:g} min", "gpt", [], minutes, workdir),
             train_and_pack(f"mixkabrn {minutes:g} min", "mixkabrn", [], minutes, workdir))
            for minutes in PRESET_BUDGETS]


def preset_lines(rows: list[tuple[float, ModelRow, ModelRow]]) -> list[str]:
    lines = ["| minutes | preset | steps | train tokens/s | val bpb (packed) | artifact bytes | peak RSS MiB "
             "| mixkabrn - gpt |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for minutes, gpt, mixkabrn in rows:
        for row in (gpt, mixkabrn):
            gap = f"{mixkabrn.packed_bpb - gpt.packed_bpb:+.4f}" if row is mixkabrn else ""
            lines.append(f"| {minutes:g} | {row.label.split()[0]} | {row.steps:,} | {row.train_tokens_per_second:,.0f} "
                         f"| {row.packed_bpb:.4f} | {row.artifact_bytes:,} | {row.max_rss_mib:,.0f} | {gap} |")
    return lines


def bench_mixkabrn_presets(output: Path) -> None:
    """Only the presets table of ``bench_mixkabrn`` (28 minutes of training instead of about an hour more)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = preset_rows(Path(tmp))
    lines = ["## seedbed bench mixkabrn-presets", "",
             f"`seedbed bench mixkabrn-presets` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. " + PRESETS_TEXT,
             "", *preset_lines(rows)]
    write_section(output, "## seedbed bench mixkabrn-presets", "\n".join(lines) + "\n")
    print("\n".join(lines))


PRESETS_TEXT = ("The `gpt` and `mixkabrn` presets as shipped (each its own shape and dtype), trained for each budget "
                "in a process of their own, one after the other, packed with the default rule; val bpb of the "
                "artifact on the whole val split; peak RSS of that process (train, pack, eval).")


def bench_mixkabrn(minutes: float, output: Path) -> None:
    from seedbed.bench.ternary import bench_ternary_matmul

    with tempfile.TemporaryDirectory() as tmp:
        presets = preset_rows(Path(tmp))
        rows = [train_and_pack(label, preset, overrides, minutes, Path(tmp), decode_contexts=DECODE_CONTEXTS)
                for label, preset, overrides in MIXKABRN_MODELS]
        peaks, artifact = phase_peaks("mixkabrn", minutes, Path(tmp))
        print("[mixkabrn decode] packed kernel beside int8 and float ...", file=sys.stderr)
        decode_rows = kernel_decode_rows(artifact)
    print("[ffn] kan beside mlp ...", file=sys.stderr)
    ffn_rows = ffn_speed_rows()
    print("[ternary] packed-ternary matmul beside float ...", file=sys.stderr)
    matmul_rows = bench_ternary_matmul(KERNEL_SHAPES)
    lines = [
        "## seedbed bench mixkabrn",
        "",
        f"`seedbed bench mixkabrn --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Every model trains for {minutes:g} minutes on the default corpus in its own process (gpt shape: "
        "6 layers, width 256, context 256, bytes; each row swaps one component) and is packed with the "
        "default int8 rule (bitlinear weights go ternary, 1.6 bits). val bpb is the full val split "
        "(296,270 bytes) of the packed artifact. Decoding is batch 1 on the artifact, median of 32 "
        "single-token steps after a prefill of the given context; state is the cache or recurrent "
        "state at that context. Peak memory is the max RSS of the row's process (train, pack, eval, decode).",
        "",
        "| model | val bpb (packed) | artifact bytes | train tokens/s | decode tok/s @256 | decode tok/s @4096 "
        "| state @256 | state @4096 | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        (rate_short, state_short), (rate_long, state_long) = r.decode[256], r.decode[4096]
        lines.append(f"| {r.label} | {r.packed_bpb:.4f} | {r.artifact_bytes:,} | {r.train_tokens_per_second:,.0f} "
                     f"| {rate_short:,.0f} | {rate_long:,.0f} | {state_short / 2**10:,.0f} KiB "
                     f"| {state_long / 2**10:,.0f} KiB | {r.max_rss_mib:,.0f} |")
    lines += ["", "The presets at equal wall clock: " + PRESETS_TEXT, "", *preset_lines(presets)]
    lines += [
        "",
        f"`mixkabrn` again, {minutes:g} minutes, each phase through the CLI in a process of its own "
        "(`seedbed train`, `pack`, `eval` on the val split, `generate` 200 tokens): peak RSS in MiB.",
        "",
        "| " + " | ".join(PHASES) + " |",
        "| " + " | ".join("---:" for _ in PHASES) + " |",
        "| " + " | ".join(f"{peaks[phase]:,.0f}" for phase in PHASES) + " |",
        "",
        "Decoding that artifact at batch 1 on each BitLinear kernel (`bitlinear.use_kernel`; float: the "
        "decoded trits times the scale in an fp32 matmul), tokens/s after a prefill of the given context:",
        "",
        "| kernel | " + " | ".join(f"decode tok/s @{context}" for context in DECODE_CONTEXTS) + " |",
        "| --- | " + " | ".join("---:" for _ in DECODE_CONTEXTS) + " |",
    ]
    lines += [f"| {kernel} | " + " | ".join(f"{rates[context]:,.1f}" for context in DECODE_CONTEXTS) + " |"
              for kernel, rates in decode_rows.items()]
    lines += [
        "",
        "Feed-forward alone, d_model 256, 4,096 tokens, forward + backward, fp32, median of 7 interleaved runs:",
        "",
        "| ffn | params | forward FLOPs/token | ms per fwd+bwd | tokens/s (fwd+bwd) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {params:,} | {flops:,} | {ms:.1f} | {FFN_TOKENS / ms * 1000:,.0f} |"
              for name, params, flops, ms in ffn_rows]
    lines += [
        "",
        "Batch 1, x W^T (1 x in times in x out), median microseconds. The first four columns are the matmul "
        "alone (activation levels given); the layer columns do the whole inference BitLinear from float "
        "input (norm, per-token quantisation, integer matmul, rescale): through torch's int8 matmul, "
        "through the packed 2-bit kernel, and as the module (which runs the packed kernel where it loads). "
        "Weights held: fp32 4 bytes a weight, int8 1, packed 0.25.",
        "",
        "| in -> out | fp32 | bf16 | float ternary | int8 ternary | int8 layer | packed layer "
        "| bitlinear module | packed vs fp32 | packed vs bf16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in matmul_rows:
        packed = m.get("packed_layer_us")
        ratio = lambda key: f"{m[key] / packed:.1f}x" if packed and key in m else "—"
        lines.append(f"| {m['in_features']} -> {m['out_features']} | {m['fp32_dense_us']:.1f} "
                     f"| {microseconds(m, 'bf16_dense_us')} | {m['ternary_reference_us']:.1f} "
                     f"| {microseconds(m, 'ternary_int8_us')} | {microseconds(m, 'int8_layer_us')} "
                     f"| {microseconds(m, 'packed_layer_us')} | {m['bitlinear_eval_us']:.1f} "
                     f"| {ratio('fp32_dense_us')} | {ratio('bf16_dense_us')} |")
    write_section(output, "## seedbed bench mixkabrn", "\n".join(lines) + "\n")
    print("\n".join(lines))
