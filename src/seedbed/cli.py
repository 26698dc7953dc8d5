"""The ``seedbed`` command. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from seedbed.errors import UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_cache_options(command: argparse.ArgumentParser, adapt: bool) -> None:
    """--no-cache, and (for eval and compress) score-first adaptation's options."""
    from seedbed.adapt import AdaptOptions

    command.add_argument("--no-cache", action="store_true",
                         help="the model alone, without the run's or artifact's n-gram cache")
    if not adapt:
        return
    defaults = AdaptOptions()
    command.add_argument("--adapt", action="store_true",
                         help="score-first adaptation: after each block of tokens is scored, the cache, its gate and "
                              "the model learn from it (scored as compress codes: --streams segments side by side)")
    command.add_argument("--adapt-every", type=positive_int, default=defaults.every, metavar="N",
                         help=f"positions per stream between updates (default {defaults.every})")
    command.add_argument("--adapt-lr", type=float, default=defaults.model_lr, metavar="LR",
                         help=f"the model's Adam learning rate per update, 0 to keep the model (default {defaults.model_lr})")
    command.add_argument("--adapt-mixer-iterations", type=int, default=defaults.mixer_iterations, metavar="I",
                         help=f"L-BFGS iterations refitting the gate per update (default {defaults.mixer_iterations})")


def adapt_options(args: argparse.Namespace):
    """The AdaptOptions the command line asks for (None without --adapt), checked."""
    from seedbed.adapt import AdaptOptions

    if not args.adapt:
        return None
    options = AdaptOptions(args.adapt_every, args.adapt_mixer_iterations, args.adapt_lr)
    options.check()
    return options


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="seedbed", description="Train, shrink and measure tiny language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train a model (presets: seedbed presets)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a built-in preset (default: gpt)")
    source.add_argument("--config", help="a TOML config file")
    source.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint")
    source.add_argument("--from", dest="base", metavar="ARTIFACT",
                        help="fine-tune a packed model on --data with LoRA adapters on its ternary linears "
                             f"(rank {FINE_TUNE_RANK}: model.linear.lora_rank=R); its weights stay as they are")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=positive_float, help="train for this many minutes of wall clock")
    length.add_argument("--steps", type=positive_int, help="train for this many optimiser steps")
    train.add_argument("--data", help="default | pystdlib | modular:P[:F][:bytes] (a+b=c mod P, train fraction F, "
                                      "numbers as digits or single bytes) | PATH (file or folder) | shards:DIR")
    train.add_argument("--out", help="run folder (default: runs/PRESET-TIME)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.d_model=384 train.lr=0.002")

    evaluate = commands.add_parser("eval", help="bits per byte of a run on held-out text")
    evaluate.add_argument("run", metavar="RUN")
    where = evaluate.add_mutually_exclusive_group()
    where.add_argument("--data", help="corpus spec, as train's --data (default: the run's own corpus)")
    where.add_argument("--text", help="a file to score whole")
    evaluate.add_argument("--split", choices=("val", "test"), default="val")
    evaluate.add_argument("--stride", type=positive_int, default=0, help="sliding-window stride (default: context/2)")
    evaluate.add_argument("--streams", type=positive_int, default=64,
                          help="with --adapt: segments scored side by side, as compress codes them (default 64)")
    add_cache_options(evaluate, adapt=True)

    generate = commands.add_parser("generate", help="sample text from a run, streaming")
    generate.add_argument("run", metavar="RUN")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--tokens", type=positive_int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--draft-layers", type=positive_int, metavar="E",
                          help="self-speculative decoding: draft with the first E layers, verify with all "
                               "(the same text at --temperature 0, the same distribution when sampling)")
    generate.add_argument("--draft-tokens", type=positive_int, default=4, metavar="D",
                          help="tokens drafted per verifying pass (with --draft-layers; default 4)")
    add_cache_options(generate, adapt=False)

    shards = commands.add_parser("export-shards", help="write a text corpus as .bin token shards")
    shards.add_argument("--data", default="default")
    shards.add_argument("--tokenizer", default="bytes", help="bytes | sp | sp:PATH")
    shards.add_argument("--vocab-size", type=positive_int, default=1024)
    shards.add_argument("-o", "--out", required=True)

    pack = commands.add_parser("pack", help="pack a run into one exact-size artifact file")
    pack.add_argument("run", metavar="RUN")
    pack.add_argument("-o", "--out", help="artifact path (default: RUN/model.seedbed)")
    pack.add_argument("--quant", default="int8",
                      help="storage kind for large matrices, plus PATTERN=KIND items: e.g. 'int6,embed.weight=int8' "
                           "(kinds: fp32 fp16 bf16 int8 int6 int4 ternary)")
    pack.add_argument("--clip-percentile", type=float, default=100.0, help="quantisation clip percentile of |w|")
    pack.add_argument("--group", type=positive_int, default=64, help="group size of int6 / int4 scales")
    pack.add_argument("--budget", type=positive_int, help="fail unless the artifact fits in this many bytes")
    pack.add_argument("--eval-tokens", type=int, default=0, help="score bpb before/after on this many val tokens "
                      "(0: the whole val split; -1: skip)")
    pack.add_argument("--report", metavar="FILE", help="also write the bytes and val bpb before and after packing "
                      "as JSON (what seedbed sweep reads)")

    info = commands.add_parser("info", help="byte breakdown of an artifact")
    info.add_argument("artifact", metavar="ARTIFACT")

    compress = commands.add_parser("compress", help="arithmetic-code a file with a model (the proof of its bpb)")
    compress.add_argument("artifact", metavar="ARTIFACT")
    compress.add_argument("file", metavar="FILE")
    compress.add_argument("-o", "--out", required=True)
    compress.add_argument("--streams", type=positive_int, default=64,
                          help="at most this many segments coded side by side (each at least 2048 tokens)")
    compress.add_argument("--no-eval", action="store_true", help="skip the bpb cross-check")
    add_cache_options(compress, adapt=True)

    decompress = commands.add_parser("decompress", help="decode a file made by seedbed compress")
    decompress.add_argument("artifact", metavar="ARTIFACT")
    decompress.add_argument("compressed", metavar="COMPRESSED")
    decompress.add_argument("-o", "--out", required=True)

    commands.add_parser("presets", help="list the built-in presets")

    compose = commands.add_parser("compose", help="compose trained experts into one model (one artifact)")
    methods = compose.add_subparsers(dest="method", required=True, parser_class=Parser)
    cbtm = methods.add_parser("cbtm", help="c-BTM: cluster the corpus, train an expert per cluster, mix them "
                                           "by the context's distance to each cluster")
    cbtm.add_argument("--data", default="default+pystdlib",
                      help="the corpus to cluster, as train's --data; 'A+B' mixes corpora (default: default+pystdlib)")
    cbtm.add_argument("--clusters", type=positive_int, default=2, help="clusters, one expert each (default 2)")
    cbtm.add_argument("--chunk-bytes", type=positive_int, default=8192,
                      help="documents are clustered in chunks of about this size (default 8192)")
    cbtm.add_argument("--top-k", type=positive_int, default=2, help="experts mixed at each position (default 2)")
    cbtm.add_argument("--temperature", type=positive_float, default=0.1,
                      help="T of the router's softmax over -distance^2 / T (default 0.1)")
    source = cbtm.add_mutually_exclusive_group()
    source.add_argument("--preset", help="each expert's preset (default: gpt)")
    source.add_argument("--seed-model", metavar="RUN",
                        help="every expert starts from this trained model's weights and config (Branch-Train-Merge)")
    source.add_argument("--experts", nargs="+", metavar="RUN",
                        help="trained run folders of cluster:0:FILE, cluster:1:FILE, ... (skips clustering and training)")
    length = cbtm.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=positive_float, help="each expert's training budget in minutes")
    length.add_argument("--steps", type=positive_int, help="each expert's training budget in steps")
    cbtm.add_argument("--parallel", type=positive_int, help="experts trained at once (default: clusters, at most cores)")
    cbtm.add_argument("--quant", default="int8", help="the artifact's storage rule, as pack's --quant (default int8)")
    cbtm.add_argument("--out", help="compose folder (default: runs/cbtm-TIME)")
    cbtm.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the experts' config, e.g. model.d_model=128")

    goose = methods.add_parser("phatgoose", help="PHATGOOSE: a frozen base, a LoRA module and its gate per cluster, "
                                                 "routed per token and layer")
    goose.add_argument("--base", required=True, metavar="RUN", help="the frozen base model (a run folder or artifact)")
    goose.add_argument("--data", default="default+pystdlib", help="the corpus to cluster (default: default+pystdlib)")
    goose.add_argument("--clusters", type=positive_int, default=2, help="clusters, one module each (default 2)")
    goose.add_argument("--chunk-bytes", type=positive_int, default=8192, help="chunk size for clustering (default 8192)")
    goose_length = goose.add_mutually_exclusive_group(required=True)
    goose_length.add_argument("--steps", type=positive_int, help="each module's LoRA training steps")
    goose_length.add_argument("--minutes", type=positive_float, help="each module's LoRA training time")
    goose.add_argument("--gate-steps", type=positive_int, default=100, help="each gate's training steps (default 100)")
    goose.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    goose.add_argument("--top-k", type=positive_int, default=2, help="modules routed to per token and layer (default 2)")
    goose.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 0.001)")
    goose.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default 16)")
    goose.add_argument("--parallel", type=positive_int, help="modules trained at once (default: clusters, at most cores)")
    goose.add_argument("--quant", default="int8", help="the artifact's storage rule, as pack's --quant (default int8)")
    goose.add_argument("--out", help="compose folder (default: runs/phatgoose-TIME)")

    calm = methods.add_parser("calm", help="CALM: an anchor model reads an augmenting model's hidden states "
                                           "through trained cross-attention bridges")
    calm.add_argument("--anchor", required=True, metavar="RUN", help="the anchor model (run folder or artifact)")
    calm.add_argument("--augmenting", required=True, metavar="RUN", help="the augmenting model (same tokenizer)")
    calm.add_argument("--data", default="default+pystdlib", help="the set the bridges train on (default: default+pystdlib)")
    calm_length = calm.add_mutually_exclusive_group(required=True)
    calm_length.add_argument("--steps", type=positive_int, help="bridge training steps")
    calm_length.add_argument("--minutes", type=positive_float, help="bridge training time")
    calm.add_argument("--every", type=positive_int, default=2, help="a bridge after every n-th anchor layer (default 2)")
    calm.add_argument("--heads", type=positive_int, default=4, help="attention heads per bridge (default 4)")
    calm.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 0.001)")
    calm.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default 16)")
    calm.add_argument("--quant", default="int8", help="the artifact's storage rule, as pack's --quant (default int8)")
    calm.add_argument("-o", "--out", required=True, help="the artifact to write")

    sweep = commands.add_parser("sweep", help="run a sweep file's trials (configs x seeds, or an Optuna search), "
                                "N at a time; run it again to resume")
    sweep.add_argument("file", metavar="FILE.toml")
    sweep.add_argument("--out", help="sweep folder (default: sweeps/NAME)")
    sweep.add_argument("--storage", metavar="URL", help="the study's database as an SQLAlchemy URL, to share one "
                       "study between workers on several machines (default: OUT/study.db, SQLite)")
    sweep.add_argument("--parallel", type=positive_int, help="trials at a time in this worker (default: one per "
                       "core, the cores' threads split between them)")
    sweep.add_argument("--heartbeat", type=positive_int, default=30, metavar="SECONDS", help="a running trial's "
                       "heartbeat; one silent for 3 of them (its worker died) is rerun (default 30)")

    board = commands.add_parser("leaderboard", help="a sweep's trials by val bpb, with Pareto plots")
    board.add_argument("sweep", metavar="SWEEP", help="the sweep folder")
    board.add_argument("--storage", metavar="URL", help="the study's database, if not the folder's own")
    board.add_argument("--markdown", metavar="FILE", help="also write the tables and plot links as Markdown")

    bench = commands.add_parser("bench", help="benchmarks that write a table to BENCHMARKS.md")
    bench.add_argument("suite", choices=("train", "codec", "seeds", "mixkabrn", "mixkabrn-presets", "hybrid",
                                          "hourglass", "peer", "grokfast", "architectures", "golf", "compose"))
    bench.add_argument("--minutes", type=positive_float, default=10.0,
                       help="train: budget for the bpb row; seeds, mixkabrn, hybrid, hourglass, grokfast, "
                            "architectures, golf: training budget of every model; compose: every row's total; "
                            "mixkabrn-presets (gpt and mixkabrn at 4 and 10 minutes): unused")
    bench.add_argument("--artifact", help="codec: the packed model to compress with")
    bench.add_argument("--variant", action="append", metavar="'NAME: key=value ...'",
                       help="train: a variant of the default preset to time and train beside the others (repeat)")
    bench.add_argument("--keep", metavar="DIR", help="golf: keep the runs and packed artifacts in DIR")
    bench.add_argument("--output", default="BENCHMARKS.md")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from seedbed.config import apply_overrides, config_from_dict, read_config_file, resolve_config
    from seedbed.train.trainer import Distributed, Trainer

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.spec={quote(args.data)}")
    if args.minutes:
        overrides += [f"train.minutes={args.minutes}", "train.steps=0"]
    if args.steps:
        overrides += [f"train.steps={args.steps}"]
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"cannot resume: {run_dir} is not a run folder (no config.toml)")
        cfg = config_from_dict(apply_overrides(read_config_file(run_dir / "config.toml"), overrides))
    else:
        cfg = fine_tune_config(args.base, args.data, overrides) if args.base else \
            resolve_config(args.preset, args.config, overrides)
        if args.out:
            run_dir = Path(args.out)
        elif Distributed.from_env().world > 1:
            raise UserError("pass --out DIR when training with several processes, so they share one run folder")
        else:
            run_dir = Path("runs") / f"{cfg.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / "checkpoint.safetensors").exists():
            raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if trainer.dist.main:
        print(f"run {run_dir}: {trainer.data.description}", file=sys.stderr)
        print(f"model: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
              f"device {trainer.device}, autocast {trainer.autocast_dtype or 'off'}", file=sys.stderr)
    result = trainer.run()
    if trainer.dist.main:
        mfu = f"{result.mfu:.1%}" if result.mfu is not None else "n/a"
        print(f"steps {result.steps}  tokens {result.tokens:,}  train time {result.train_seconds:.1f} s  "
              f"(+ warm-up {result.warmup_seconds:.1f} s, not counted)  {result.tokens_per_second:,.0f} tok/s  "
              f"MFU {mfu}")
        print(f"val bpb {result.val_bpb:.4f}" + (f"  (with the n-gram cache {result.val_bpb_cache:.4f})"
                                                  if result.val_bpb_cache is not None else ""))
        if result.val_answer_accuracy is not None:
            print(f"val answer accuracy {result.val_answer_accuracy:.2%}")
        print(f"run folder {run_dir}")


FINE_TUNE_RANK = 8
# What fine-tuning changes in the base's config, before the user's own overrides: LoRA on every
# ternary linear, only the adapters trained (AdamW: Muon's orthogonalised steps suit full matrices),
# no warm-up needed for adapters that start at zero.
FINE_TUNE_DEFAULTS = [f"model.linear.lora_rank={FINE_TUNE_RANK}", "train.trainable=\"lora\"",
                      "train.optimizer=\"adamw\"", "train.lr=0.003", "train.warmup_steps=0"]


def fine_tune_config(artifact: str, data: str | None, overrides: list[str]):
    """``seedbed train --from ARTIFACT``: the artifact's own config, set up to train LoRA adapters on
    ``data`` from the artifact's weights; refused, before any work, for a model with no ternary linears."""
    from seedbed.config import apply_overrides, config_from_dict
    from seedbed.pack.artifact import read_artifact

    if not data:
        raise UserError("--from ARTIFACT fine-tunes on your own text: pass --data PATH (a file or folder)")
    values = read_artifact(artifact).config
    if values.get("model", {}).get("linear", {}).get("kind") != "bitlinear":
        raise UserError(f"--from {artifact}: its linears are not bitlinear, so there are no ternary weights to adapt")
    base = [f"train.init_from={quote(str(Path(artifact).resolve()))}", *FINE_TUNE_DEFAULTS]
    return config_from_dict(apply_overrides(values, base + overrides))


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_eval(args: argparse.Namespace) -> None:
    from seedbed.runs import load

    adapt = adapt_options(args)
    loaded = load(args.run)
    use_cache = not args.no_cache
    options = dict(stride=args.stride, use_cache=use_cache, adapt=adapt, streams=args.streams)
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"text file {path} does not exist")
        result = loaded.evaluate(path.read_bytes(), **options)
        what = str(path)
    else:
        spec = args.data or loaded.config.data.spec
        result = loaded.evaluate_split(spec, args.split, **options)
        what = f"{spec} [{args.split}]"
    how = ("model + n-gram cache" if use_cache and loaded.cache is not None else "model alone") + \
        (", adapted score-first" if adapt else "")
    print(f"{what}: bpb {result.bpb:.4f}  tokens {result.tokens:,}  bytes {result.n_bytes:,}  "
          f"bits/token {result.bits_per_token:.4f}  ({how}; {result.seconds:.1f} s)")
    if result.answers_total:
        print(f"answer accuracy {result.answer_accuracy:.2%} ({result.answers_right:,} of {result.answers_total:,} "
              "equations right, argmax of every answer token)")


def cmd_generate(args: argparse.Namespace) -> None:
    from seedbed.model.layerskip import DraftStats
    from seedbed.runs import load

    loaded = load(args.run)
    stats = DraftStats()
    pieces = loaded.stream(args.prompt, args.tokens, args.temperature, args.top_k, args.top_p, args.seed,
                           draft_layers=args.draft_layers or 0, draft_tokens=args.draft_tokens, stats=stats,
                           use_cache=not args.no_cache)
    first = next(pieces, "")  # bad options fail here, before any text is written
    start = time.perf_counter()
    sys.stdout.write(args.prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.draft_layers:
        print(f"self-speculative: {args.draft_layers} draft layers, {args.draft_tokens} drafts per pass, "
              f"{stats.accepted:,} of {stats.drafted:,} drafts accepted ({stats.acceptance:.1%}) in {stats.rounds:,} "
              f"verifying passes, {time.perf_counter() - start:.2f} s", file=sys.stderr)


def cmd_export_shards(args: argparse.Namespace) -> None:
    from seedbed.data import export_shards

    summary = export_shards(args.data, args.out, args.tokenizer, args.vocab_size)
    print(f"{summary['description']} -> {summary['out_dir']}")
    for name, split in summary["splits"].items():
        print(f"  {name}: {split['tokens']:,} tokens ({split['bytes']:,} bytes) in {', '.join(split['files'])}")
    print(f"train on them with: seedbed train --data shards:{summary['out_dir']}")


def cmd_pack(args: argparse.Namespace) -> None:
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import load_artifact, pack_model
    from seedbed.runs import load

    if args.report and args.eval_tokens < 0:
        raise UserError("--report writes the val bpb: it needs --eval-tokens >= 0")
    loaded = load(args.run)
    rule = QuantRule.parse(args.quant, args.clip_percentile, args.group)
    out = Path(args.out) if args.out else Path(args.run) / "model.seedbed"
    result = pack_model(loaded, out, rule, args.budget)
    print(f"wrote {out}: {result.size:,} bytes ({result.codec}; {result.payload_size:,} bytes before compression)")
    if args.eval_tokens >= 0:
        packed = load_artifact(out)
        after = packed.evaluate_split(loaded.config.data.spec, "val", max_tokens=args.eval_tokens, use_cache=False)
        if args.eval_tokens == 0 and loaded.recorded_val_bpb is not None:
            before, source = loaded.recorded_val_bpb, "as the run recorded it"
        else:
            before, source = loaded.evaluate_split(loaded.config.data.spec, "val", max_tokens=args.eval_tokens,
                                                   use_cache=False).bpb, "recomputed"
        print(f"val bpb before packing {before:.4f} ({source})  after {after.bpb:.4f}  gap {after.bpb - before:+.4f}  "
              f"({after.tokens:,} tokens)")
        if args.report:
            from seedbed.fileio import atomic_write_text
            from seedbed.hardware import describe_machine

            report = {"artifact": str(out), "bytes": result.size, "quant": args.quant, "val_bpb": after.bpb,
                      "val_bpb_before": before, "val_tokens": after.tokens, "machine": describe_machine()}
            atomic_write_text(args.report, json.dumps(report, indent=1) + "\n")
        if packed.cache is not None:
            mixed = packed.evaluate_split(loaded.config.data.spec, "val", max_tokens=args.eval_tokens)
            print(f"val bpb of the packed model with its n-gram cache {mixed.bpb:.4f}")


def cmd_compose(args: argparse.Namespace) -> None:
    if args.method == "phatgoose":
        compose_phatgoose(args)
        return
    if args.method == "calm":
        compose_calm(args)
        return
    from seedbed.compose.workflow import CLUSTERS_FILE, base_tokenizer, cbtm_from_runs, cluster_corpus, expert_config, \
        shared_tokenizer, train_experts
    from seedbed.config import apply_overrides, config_from_dict, resolve_config
    from seedbed.data.clusters import parse_cluster_spec
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import describe, pack_model
    from seedbed.runs import load

    rule = QuantRule.parse(args.quant)
    if args.top_k > (len(args.experts) if args.experts else args.clusters):
        raise UserError(f"--top-k {args.top_k} is more than the {len(args.experts or []) or args.clusters} experts")
    if args.experts:
        if args.overrides or args.minutes or args.steps:
            raise UserError("--experts are already trained: drop the training options and KEY=VALUE overrides")
        experts = [load(run) for run in args.experts]
        spec = [parse_cluster_spec(expert.config.data.spec) for expert in experts]
        if any(s is None for s in spec) or [i for i, _ in spec] != list(range(len(experts))) or \
                len({path.resolve() for _, path in spec}) != 1:
            raise UserError("--experts must be runs trained on cluster:0:FILE, cluster:1:FILE, ... of one clusters file, "
                            "in that order")
        clusters_path = spec[0][1]
        out = Path(args.out) if args.out else clusters_path.parent
    else:
        if not (args.minutes or args.steps):
            raise UserError("set each expert's training budget: --minutes M or --steps N")
        budget = [f"train.minutes={args.minutes}", "train.steps=0"] if args.minutes else [f"train.steps={args.steps}"]
        settings = [*args.overrides, f"data.spec={quote(args.data)}", *budget]
        seed = load(args.seed_model) if args.seed_model else None
        if seed is None:
            base = resolve_config(args.preset, None, settings)
        else:  # the seed's own config, so the experts are its model; its weights start each of them
            init = f"train.init_from={quote(str(Path(args.seed_model).resolve()))}"
            base = config_from_dict(apply_overrides(seed.config.to_dict(), [*settings, init]))
        out = Path(args.out) if args.out else Path("runs") / f"cbtm-{time.strftime('%Y%m%d-%H%M%S')}"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; pick another --out, or pass --experts to reuse trained experts")
        out.mkdir(parents=True, exist_ok=True)
        clusters_path = out / CLUSTERS_FILE
        print(f"[1/4] tokenizer ({'the seed model' if seed else base.data.tokenizer})", file=sys.stderr)
        tokenizer = shared_tokenizer(base, out) if seed is None else base_tokenizer(seed, out)
        print(f"[2/4] clustering {args.data} into {args.clusters} in chunks of {args.chunk_bytes} bytes", file=sys.stderr)
        assignment = cluster_corpus(args.data, tokenizer, base.data.vocab_size, args.clusters, args.chunk_bytes,
                                    clusters_path)
        for cluster in range(args.clusters):
            print("  cluster {}: {}".format(cluster, ", ".join(f"{(assignment[name] == cluster).sum()} {name}"
                                                             for name in ("train", "val", "test"))), file=sys.stderr)
        parallel = args.parallel or min(args.clusters, os.cpu_count() or 1)
        print(f"[3/4] training {args.clusters} experts, {parallel} at a time", file=sys.stderr)
        configs = [expert_config(base, clusters_path, i, tokenizer) for i in range(args.clusters)]
        experts = [load(run) for run in train_experts(configs, out, parallel)]
    print("[4/4] packing the experts and the router", file=sys.stderr)
    composed = cbtm_from_runs(experts, clusters_path, args.top_k, args.temperature)
    artifact = out / "cbtm.seedbed"
    result = pack_model(composed, artifact, rule)
    print(describe(artifact))
    print(f"wrote {artifact}: {result.size:,} bytes; score it with: seedbed eval {artifact}")


def compose_phatgoose(args: argparse.Namespace) -> None:
    from seedbed.compose.workflow import CLUSTERS_FILE, base_tokenizer, cluster_corpus, phatgoose_from_modules, \
        train_phatgoose_modules
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import describe, pack_model
    from seedbed.runs import load

    rule = QuantRule.parse(args.quant)
    if args.top_k > args.clusters:
        raise UserError(f"--top-k {args.top_k} is more than the {args.clusters} modules")
    base = load(args.base)
    out = Path(args.out) if args.out else Path("runs") / f"phatgoose-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    clusters_path = out / CLUSTERS_FILE
    tokenizer = base_tokenizer(base, out)
    print(f"[1/3] clustering {args.data} into {args.clusters} in chunks of {args.chunk_bytes} bytes", file=sys.stderr)
    cluster_corpus(args.data, tokenizer, base.config.data.vocab_size, args.clusters, args.chunk_bytes, clusters_path)
    parallel = args.parallel or min(args.clusters, os.cpu_count() or 1)
    print(f"[2/3] training {args.clusters} LoRA modules and gates, {parallel} at a time", file=sys.stderr)
    specs = [f"cluster:{i}:{clusters_path.resolve()}" for i in range(args.clusters)]
    paths = train_phatgoose_modules(Path(args.base), specs, tokenizer, args.rank, budget_of(args),
                                    {"steps": args.gate_steps}, args.batch_size, args.lr, out, parallel)
    print("[3/3] packing the base, the modules and their gates", file=sys.stderr)
    composed = phatgoose_from_modules(base, paths, args.rank, args.top_k, args.data)
    artifact = out / "phatgoose.seedbed"
    result = pack_model(composed, artifact, rule)
    print(describe(artifact))
    print(f"wrote {artifact}: {result.size:,} bytes; score it with: seedbed eval {artifact}")


def budget_of(args: argparse.Namespace) -> dict:
    """``--steps N`` or ``--minutes M`` as the compositions' training budget."""
    return {"steps": args.steps} if args.steps else {"seconds": args.minutes * 60}


def compose_calm(args: argparse.Namespace) -> None:
    from seedbed.compose.workflow import calm_from_runs
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import describe, pack_model
    from seedbed.runs import load

    rule = QuantRule.parse(args.quant)
    anchor, augmenting = load(args.anchor), load(args.augmenting)
    length = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
    print(f"training the bridges for {length} on {args.data}", file=sys.stderr)
    composed, fit = calm_from_runs(anchor, augmenting, args.data, args.every, args.heads, budget_of(args),
                                   args.batch_size, args.lr)
    result = pack_model(composed, args.out, rule)
    print(describe(args.out))
    print(f"bridges: {fit.steps} steps in {fit.seconds:.1f} s, last training loss {fit.loss:.4f}")
    print(f"wrote {args.out}: {result.size:,} bytes; score it with: seedbed eval {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    from seedbed.pack.pack import describe

    print(describe(args.artifact))


def codec_progress(label: str):
    """(progress callback, close). The bar appears with the first coded position, so a file
    rejected for its header prints nothing but the error line."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(desc=label, unit="pos", dynamic_ncols=True, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh() if done == total or done % 64 == 0 else None

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def cmd_compress(args: argparse.Namespace) -> None:
    from seedbed.codec import artifact_digest, compress_bytes
    from seedbed.fileio import atomic_write_bytes
    from seedbed.runs import load

    source = Path(args.file)
    if not source.is_file():
        raise UserError(f"input file {source} does not exist")
    adapt = adapt_options(args)
    loaded = load(args.artifact)
    if not Path(args.artifact).is_file():
        raise UserError(f"{args.artifact} is a run folder; pack it first (seedbed pack {args.artifact})")
    data = source.read_bytes()
    update, close = codec_progress("compress")
    try:
        blob, stats = compress_bytes(loaded, artifact_digest(args.artifact), data, args.streams, progress=update,
                                     use_cache=not args.no_cache, adapt=adapt)
    finally:
        close()
    atomic_write_bytes(args.out, blob)
    print(f"{source}: {stats.original_bytes:,} bytes -> {len(blob):,} bytes ({len(blob) - stats.payload_bytes} header)"
          f"  {stats.bpb:.4f} bits per byte  {stats.original_bytes / max(stats.seconds, 1e-9):,.0f} bytes/s")
    if not args.no_eval and data:
        result = loaded.evaluate(data, use_cache=not args.no_cache, adapt=adapt, streams=args.streams)
        gap = stats.bpb / result.bpb - 1
        print(f"seedbed eval on the same text: {result.bpb:.4f} bpb; coded size differs by {gap:+.2%}")


def cmd_decompress(args: argparse.Namespace) -> None:
    from seedbed.codec import artifact_digest, decompress_bytes
    from seedbed.fileio import atomic_write_bytes
    from seedbed.runs import load

    compressed = Path(args.compressed)
    if not compressed.is_file():
        raise UserError(f"compressed file {compressed} does not exist")
    loaded = load(args.artifact)
    update, close = codec_progress("decompress")
    try:
        data, stats = decompress_bytes(loaded, artifact_digest(args.artifact), compressed.read_bytes(), progress=update)
    finally:
        close()
    atomic_write_bytes(args.out, data)
    print(f"{compressed} -> {args.out}: {len(data):,} bytes  {len(data) / max(stats.seconds, 1e-9):,.0f} bytes/s")


def cmd_sweep(args: argparse.Namespace) -> int:
    import shutil

    from seedbed.fileio import atomic_write_text
    from seedbed.sweep.leaderboard import SWEEP_RECORD
    from seedbed.sweep.runner import Sweep, shareable_url
    from seedbed.sweep.spec import read_sweep

    spec = read_sweep(args.file)
    folder = Path(args.out or Path("sweeps") / spec.name)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sweep = Sweep(spec, folder, args.storage, args.parallel or 0, args.heartbeat)
    except UserError:
        if created:  # nothing half-made: a storage that cannot be opened leaves no sweep folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    record = {"study": spec.name, "file": str(Path(args.file).resolve()), "storage": shareable_url(args.storage)}
    atomic_write_text(folder / SWEEP_RECORD, json.dumps(record, indent=1) + "\n")
    total = len(spec.planned) or spec.search.trials
    print(f"sweep {spec.name}: {total} trials, {sweep.parallel} at a time, threads per trial: {sweep.threads}, "
          f"study in {sweep.url}", file=sys.stderr)
    counts = sweep.run()
    ran = ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n) or "none (all were done)"
    print(f"this worker's trials: {ran}; the table: seedbed leaderboard {folder}")
    return 1 if counts["invalid"] or counts["crashed"] else 0


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from seedbed.sweep.leaderboard import leaderboard

    print(leaderboard(Path(args.sweep), args.storage, Path(args.markdown) if args.markdown else None), end="")


def cmd_presets(args: argparse.Namespace) -> None:
    from seedbed.config import preset_description, preset_names

    for name in preset_names():
        print(f"{name:12s} {preset_description(name)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from seedbed.bench.architectures import bench_architectures
    from seedbed.bench.compose import bench_compose
    from seedbed.bench.golf import bench_golf
    from seedbed.bench.grokfast import bench_grokfast
    from seedbed.bench.hourglass import bench_hourglass
    from seedbed.bench.hybrid import bench_hybrid
    from seedbed.bench.models import bench_mixkabrn, bench_mixkabrn_presets, bench_seeds
    from seedbed.bench.peer import bench_peer
    from seedbed.bench.train import bench_codec, bench_train

    if args.keep and args.suite != "golf":
        raise UserError("--keep is an option of bench golf only")
    if args.suite == "train":
        bench_train(args.minutes, Path(args.output), variants=args.variant)
    elif args.suite == "seeds":
        bench_seeds(args.minutes, Path(args.output))
    elif args.suite == "mixkabrn":
        bench_mixkabrn(args.minutes, Path(args.output))
    elif args.suite == "mixkabrn-presets":
        bench_mixkabrn_presets(Path(args.output))
    elif args.suite == "hybrid":
        bench_hybrid(args.minutes, Path(args.output))
    elif args.suite == "hourglass":
        bench_hourglass(args.minutes, Path(args.output))
    elif args.suite == "grokfast":
        bench_grokfast(args.minutes, Path(args.output))
    elif args.suite == "peer":
        bench_peer(Path(args.output))
    elif args.suite == "architectures":
        bench_architectures(args.minutes, Path(args.output))
    elif args.suite == "golf":
        bench_golf(args.minutes, Path(args.output), Path(args.keep) if args.keep else None)
    elif args.suite == "compose":
        bench_compose(args.minutes, Path(args.output))
    elif not args.artifact or not Path(args.artifact).is_file():
        raise UserError("bench codec needs --artifact FILE (make one with seedbed pack RUN)")
    else:
        bench_codec(Path(args.artifact), Path(args.output))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export-shards": cmd_export_shards,
            "pack": cmd_pack, "info": cmd_info, "compress": cmd_compress, "decompress": cmd_decompress,
            "presets": cmd_presets, "bench": cmd_bench, "compose": cmd_compose, "sweep": cmd_sweep,
            "leaderboard": cmd_leaderboard}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code or 0
