"""``seedbed bench compose``: does composing experts beat one dense model at equal compute?

efficient_transformer_v1's hypothesis, "composition brings generalization", tested on the mixed
corpus ``default+pystdlib`` (Shakespeare + the Python standard library). Every model is the
``gpt`` preset (bytes, 4 layers x 128, context 128), and every row spends one budget of M minutes
of timed training steps on this CPU, each job alone with all its cores, one after another:

- **dense**: one model, M minutes on the mixture;
- **c-BTM, K = 2 and 4**: the train chunks (8 kB) clustered by tf-idf and balanced k-means, one
  expert trained from scratch on each cluster for M/K minutes, mixed top-2 by the router;
- **c-BTM from a seed** (Branch-Train-Merge, as the c-BTM paper starts its experts): a seed model
  trained M/2 minutes on the mixture, two experts branched from it, M/4 minutes each;
- **PHATGOOSE**: the same seed, frozen, as the base; a rank-8 LoRA module per cluster trained M/4
  minutes each (its last tenth on its gate, the LoRA frozen); routed top-2 per token and layer;
- **CALM**: the same seed as the anchor; an augmenting model trained M/4 minutes on pystdlib only;
  bridges (every 2nd anchor layer, 4 heads) trained M/4 minutes on the mixture.

The seed is trained once and shared by the last three rows; each row's budget counts it. The
"wall if parallel" column is what the row's training takes with each of its independent jobs on
its own machine of this kind: the sum over its stages of the longest job in the stage. Each row is
packed int8 and scored on the whole val split of each domain; "overall" is both domains' bits over
both domains' bytes. Scoring cost is the wall time of those two scorings per byte (batched sliding
windows); "params run per token" counts every expert c-BTM evaluates (it runs all of them).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from seedbed.bench.models import in_fresh_process
from seedbed.bench.train import write_section
from seedbed.hardware import describe_machine

MIX = "default+pystdlib"
DOMAINS = ("default", "pystdlib")
CHUNK_BYTES = 8192
TOP_K = 2
TEMPERATURE = 0.1  # seedbed compose cbtm's default
LORA_RANK, BATCH_SIZE, LR = 8, 16, 1e-3  # seedbed compose phatgoose's defaults
GATE_SHARE = 0.1  # of each module's minutes, for its gate ("trained briefly")
CALM_EVERY, CALM_HEADS = 2, 4  # seedbed compose calm's defaults
QUIET = ["train.eval_every_seconds=1e9"]  # no periodic evals: the packed artifact is scored at the end


@dataclass
class Row:
    label: str
    artifact: Path
    stages: list[list[float]]  # timed training seconds of each job, stage by stage


@dataclass
class Scored:
    label: str
    bpb: dict[str, float]  # per domain, and "overall"
    artifact_bytes: int
    train_seconds: float
    parallel_seconds: float
    params_per_token: int
    scoring_us_per_byte: float


def gpt_config(spec: str, minutes: float, *extra: str):
    from seedbed.config import resolve_config

    return resolve_config("gpt", None, [f'data.spec="{spec}"', f"train.minutes={minutes}", "train.steps=0",
                                        *QUIET, *extra])


def _train(cfg, run_dir: Path, queue) -> None:
    from seedbed.train.trainer import Trainer

    try:
        queue.put(Trainer(cfg, run_dir, progress=True).run().train_seconds)
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[{run_dir.name}] {type(error).__name__}: {error}"))


def train(cfg, run_dir: Path) -> float:
    """Train ``cfg`` into ``run_dir`` in a fresh process; its timed training seconds."""
    print(f"[{run_dir.name}] {cfg.data.spec}, {cfg.train.minutes:g} min", file=sys.stderr)
    return in_fresh_process(_train, cfg, run_dir)


def pack(model, artifact: Path) -> Path:
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import pack_model

    pack_model(model, artifact, QuantRule.parse("int8"))
    return artifact


def cbtm(label: str, work: Path, clusters: Path, base_cfg) -> Row:
    """Experts trained on ``clusters``' clusters from ``base_cfg``, one after another, and their mixture packed."""
    from seedbed.compose.workflow import cbtm_from_runs, expert_config
    from seedbed.data.clusters import read_clusters
    from seedbed.runs import load

    count = read_clusters(clusters)["clusters"]
    runs = [work / f"expert-{index}" for index in range(count)]
    seconds = [train(expert_config(base_cfg, clusters, index, "bytes"), run) for index, run in enumerate(runs)]
    composed = cbtm_from_runs([load(run) for run in runs], clusters, TOP_K, TEMPERATURE)
    return Row(label, pack(composed, work / "cbtm.seedbed"), [seconds])


def phatgoose(work: Path, seed: Path, seed_seconds: float, clusters: Path, minutes: float) -> Row:
    from seedbed.compose.workflow import phatgoose_from_modules, train_phatgoose_modules
    from seedbed.runs import load
    from seedbed.train.checkpoint import load_checkpoint

    specs = [f"cluster:{index}:{clusters}" for index in range(2)]
    print(f"[phatgoose] 2 LoRA modules, {minutes:g} min each", file=sys.stderr)
    seconds = minutes * 60
    paths = train_phatgoose_modules(seed, specs, "bytes", LORA_RANK, {"seconds": seconds * (1 - GATE_SHARE)},
                                    {"seconds": seconds * GATE_SHARE}, BATCH_SIZE, LR, work, parallel=1)
    seconds = [load_checkpoint(path)[1]["seconds"] for path in paths]
    composed = phatgoose_from_modules(load(seed), paths, LORA_RANK, TOP_K, MIX)
    return Row("PHATGOOSE: seed as base + 2 LoRA modules", pack(composed, work / "phatgoose.seedbed"),
               [[seed_seconds], seconds])


def _calm(anchor: Path, augmenting: Path, spec: str, seconds: float, artifact: Path, queue) -> None:
    from seedbed.compose.workflow import calm_from_runs
    from seedbed.runs import load

    try:
        composed, fit = calm_from_runs(load(anchor), load(augmenting), spec, CALM_EVERY, CALM_HEADS,
                                       {"seconds": seconds}, BATCH_SIZE, LR)
        pack(composed, artifact)
        queue.put(fit.seconds)
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which re-raises it
        queue.put(RuntimeError(f"[calm] {type(error).__name__}: {error}"))


def calm(work: Path, seed: Path, seed_seconds: float, minutes: float) -> Row:
    augmenting_seconds = train(gpt_config(DOMAINS[1], minutes), work / "augmenting")
    print(f"[calm] bridges, {minutes:g} min", file=sys.stderr)
    bridge_seconds = in_fresh_process(_calm, seed, work / "augmenting", MIX, minutes * 60, work / "calm.seedbed")
    return Row("CALM: seed as anchor + code model", work / "calm.seedbed",
               [[seed_seconds, augmenting_seconds], [bridge_seconds]])


def score(row: Row) -> Scored:
    from seedbed.compose import effective_parameters_of
    from seedbed.pack.pack import load_artifact

    loaded = load_artifact(row.artifact)
    results = {domain: loaded.evaluate_split(domain, "val") for domain in DOMAINS}
    bits, n_bytes = sum(r.bits for r in results.values()), sum(r.n_bytes for r in results.values())
    bpb = {**{domain: r.bpb for domain, r in results.items()}, "overall": bits / n_bytes}
    print(f"  {row.label}: " + ", ".join(f"{name} {value:.4f}" for name, value in bpb.items()), file=sys.stderr)
    return Scored(row.label, bpb, row.artifact.stat().st_size, sum(map(sum, row.stages)),
                  sum(map(max, row.stages)), effective_parameters_of(loaded.model),
                  1e6 * sum(r.seconds for r in results.values()) / n_bytes)


def bench_compose(minutes: float, output: Path) -> None:
    from seedbed.compose.workflow import cluster_corpus
    from seedbed.runs import load

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        dense = train(gpt_config(MIX, minutes), work / "dense")
        rows.append(Row("dense", pack(load(work / "dense"), work / "dense.seedbed"), [[dense]]))
        clusters = {}
        for count in (2, 4):
            folder = work / f"cbtm{count}"
            folder.mkdir()
            clusters[count] = folder / "clusters.json"
            print(f"[cbtm{count}] clustering {MIX} into {count}", file=sys.stderr)
            cluster_corpus(MIX, "bytes", 256, count, CHUNK_BYTES, clusters[count])
            rows.append(cbtm(f"c-BTM, {count} experts from scratch", folder, clusters[count],
                             gpt_config(MIX, minutes / count)))
        seed = work / "seed"
        seed_seconds = train(gpt_config(MIX, minutes / 2), seed)
        branched = cbtm("c-BTM, 2 experts branched from the seed", work / "btm", clusters[2],
                        gpt_config(MIX, minutes / 4, f'train.init_from="{seed}"'))
        branched.stages.insert(0, [seed_seconds])
        rows.append(branched)
        (work / "phatgoose").mkdir()
        rows.append(phatgoose(work / "phatgoose", seed, seed_seconds, clusters[2], minutes / 4))
        rows.append(calm(work, seed, seed_seconds, minutes / 4))
        scored = [score(row) for row in rows]
    write_report(scored, minutes, output)


def write_report(rows: list[Scored], minutes: float, output: Path) -> None:
    dense = rows[0]
    best = min(rows, key=lambda r: r.bpb["overall"])
    winners = [r.label for r in rows[1:] if r.bpb["overall"] < dense.bpb["overall"]]
    verdict = (f"Composing beats the dense model overall in: {', '.join(winners)}; the best is {best.label} "
               f"({best.bpb['overall']:.4f} against dense {dense.bpb['overall']:.4f})." if winners else
               f"No composition beats the dense model overall at this budget (dense {dense.bpb['overall']:.4f}; "
               f"the best composition, {min(rows[1:], key=lambda r: r.bpb['overall']).label}, "
               f"{min(r.bpb['overall'] for r in rows[1:]):.4f}).")
    lines = [
        "## seedbed bench compose",
        "",
        f"`seedbed bench compose --minutes {minutes:g}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}. "
        f"Corpus `{MIX}`; every model is the `gpt` preset; every row spends {minutes:g} minutes of timed training "
        "steps in all (jobs one after another, each with all cores): dense all of it; c-BTM K experts "
        f"{minutes:g}/K each; the seed {minutes / 2:g} on the mixture, then (branched c-BTM) 2 experts, (PHATGOOSE) "
        f"2 rank-{LORA_RANK} LoRA modules (the last {GATE_SHARE:.0%} of each on its gate), or (CALM) an augmenting model on {DOMAINS[1]} and "
        f"the bridges, {minutes / 4:g} each. Packed int8; val bpb of each domain's whole val split, overall = bits "
        "of both over bytes of both. Wall if parallel: each independent job on its own machine like this one. "
        "Scoring: seconds of the two val scorings per byte. Method details in `bench/compose.py`.",
        "",
        f"| model | {DOMAINS[0]} val bpb | {DOMAINS[1]} val bpb | overall val bpb | artifact bytes | training s "
        "| wall s if parallel | params run per token | scoring µs/byte |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        overall = f"**{r.bpb['overall']:.4f}**" if r is best else f"{r.bpb['overall']:.4f}"
        lines.append(f"| {r.label} | {r.bpb[DOMAINS[0]]:.4f} | {r.bpb[DOMAINS[1]]:.4f} | {overall} "
                     f"| {r.artifact_bytes:,} | {r.train_seconds:,.0f} | {r.parallel_seconds:,.0f} "
                     f"| {r.params_per_token:,} | {r.scoring_us_per_byte:,.1f} |")
    lines += ["", verdict]
    write_section(output, "## seedbed bench compose", "\n".join(lines) + "\n")
    print("\n".join(lines))
