"""The training loop: one process or several (torchrun), CPU or GPU, by steps or by minutes.

A run folder holds ``config.toml`` (resolved), ``metrics.jsonl``, ``curve.png``,
``checkpoint.safetensors`` and, for SentencePiece, ``tokenizer.model``. The wall-clock
budget counts training steps only; evaluation and checkpointing are not charged to it,
and neither is warm-up: the first step of each process (the first ``COMPILE_WARMUP_STEPS``
with ``train.compile``, which trace and compile) is timed apart as ``warmup_seconds``, its
tokens trained but left out of tokens/s and MFU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from seedbed.cachemix import CACHE_FILE, TextCache, build_text_cache
from seedbed.config import RunConfig, check_resume_config
from seedbed.data import load_dataset
from seedbed.errors import UserError
from seedbed.eval import evaluate_bpb
from seedbed.fileio import atomic_write_bytes, atomic_write_text
from seedbed.hardware import fast_bf16
from seedbed.model import LM, count_parameters
from seedbed.model.depths import depth_routing_metrics
from seedbed.model.moe import routing_metrics
from seedbed.ngram import NgramCache
from seedbed.perf import matmul_peak, training_flops_per_token
from seedbed.plot import plot_curves
from seedbed.train.checkpoint import (CHECKPOINT_NAME, load_checkpoint, optimizer_tensors, restore_optimizers,
                                      save_checkpoint)
from seedbed.train.grokfast import GradFilter
from seedbed.train.optim import build_optimizers, lr_multiplier
from seedbed.train.seed_search import SeedSearch


IGNORED_TARGET = -100  # cross_entropy's ignore_index: a target the loss skips
COMPILE_WARMUP_STEPS = 2  # the first compiles the training graph; the second catches a recompile


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    warmup_seconds: float
    val_bpb: float
    tokens_per_second: float
    mfu: float | None
    params: int
    val_answer_accuracy: float | None = None  # modular:P data: equations whose answer the argmax gets right
    val_bpb_cache: float | None = None  # with the n-gram cache mixed in (cache.orders > 0)


def pick_device(name: str, dist_info: Distributed) -> torch.device:
    """CUDA device ``local_rank`` when asked (``cuda``) or present (``auto``), else the CPU.

    Every local rank needs a GPU of its own: with more local ranks than GPUs each rank refuses with
    the same line before any process group starts (a rank on a missing device would leave the
    others waiting in NCCL). Ranks share the CPU, with gloo, only when ``train.device=cpu`` asks."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available")
        gpus = torch.cuda.device_count()
        if dist_info.local_world > gpus:
            raise UserError(f"{dist_info.local_world} local ranks but {gpus} CUDA device{'s' * (gpus != 1)} on this "
                            f"machine: start at most {gpus} per node (torchrun --nproc_per_node {gpus}), or set "
                            "train.device=cpu to train every rank on the CPU with gloo")
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def pick_autocast(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively (``dtype=auto``), or as asked."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if fast_bf16(device) else None


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = Distributed.from_env()
        self.progress = progress and self.dist.main
        tcfg = cfg.train
        if tcfg.steps == 0 and tcfg.minutes == 0:
            raise UserError("set how long to train: --steps N or --minutes M (train.steps / train.minutes)")
        checkpoint_path = self.run_dir / CHECKPOINT_NAME
        if resume and not checkpoint_path.is_file():
            raise UserError(f"cannot resume: {self.run_dir} has no {CHECKPOINT_NAME}")
        # Load the checkpoint before anything is set up, so a bad file fails fast.
        self.checkpoint = load_checkpoint(checkpoint_path) if resume else None
        if self.checkpoint is not None and self.checkpoint[1]["world"] != self.dist.world:
            raise UserError(f"cannot resume with {self.dist.world} processes: the checkpoint was trained with "
                            f"{self.checkpoint[1]['world']} (the data order depends on the world size)")
        if self.checkpoint is not None:  # before the data is loaded; the vocabulary comes from it
            check_resume_config(self.checkpoint[1]["config"], cfg, skip=frozenset({"model.vocab_size"}))

        self.device = pick_device(tcfg.device, self.dist)
        # train.threads, else OMP_NUM_THREADS as torch reads it, else the cores shared between local ranks
        threads = tcfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or \
            max(1, (os.cpu_count() or 1) // self.dist.local_world)
        torch.set_num_threads(threads)
        if self.dist.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.autocast_dtype = pick_autocast(tcfg.dtype, self.device)

        # Rank 0 fills the data cache first so the ranks don't race to download it.
        if not self.dist.main:
            dist.barrier()
        self.data = load_dataset(cfg.data.spec, cfg.data.tokenizer, cfg.data.vocab_size)
        if self.dist.main and self.dist.world > 1:
            dist.barrier()
        cfg.model.vocab_size = self.data.tokenizer.vocab_size
        if self.checkpoint is not None:
            check_resume_config(self.checkpoint[1]["config"], cfg)
        context = cfg.model.max_seq_len
        if len(self.data.train.tokens) < context + 2:
            raise UserError(f"the training split has {len(self.data.train.tokens)} tokens, fewer than one "
                            f"context of {context} + 1; use a bigger corpus or a smaller model.max_seq_len")
        if len(self.data.val.tokens) < 2:
            raise UserError("the validation split is empty; use a bigger corpus")
        # The whole training split lives on the device, so a batch is one gather there.
        self.train_tokens = torch.from_numpy(np.asarray(self.data.train.tokens, dtype=np.int32)).to(self.device)
        self.window = torch.arange(context + 1, device=self.device)
        # train.loss_on = answers: the targets that are not an answer token are ignored by the loss.
        self.trained_targets = None
        if tcfg.loss_on == "answers":
            if self.data.train.answers is None:
                raise UserError("train.loss_on=answers needs modular:P data (its splits mark the answer tokens)")
            gaps = np.diff(np.flatnonzero(self.data.train.answers >= 0), prepend=-1)
            if gaps.max() > context:  # a window without an answer would have no loss at all
                raise UserError(f"train.loss_on=answers needs model.max_seq_len >= {gaps.max()} (tokens from one "
                                f"answer to the next), got {context}")
            self.trained_targets = torch.from_numpy(self.data.train.answers >= 0).to(self.device)

        torch.manual_seed(tcfg.seed)
        self.model = LM(cfg.model).to(self.device)
        if tcfg.init_from and self.checkpoint is None:
            self.initialise_from(tcfg.init_from)
        if tcfg.trainable == "lora":
            freeze_all_but_adapters(self.model)
        self.optimizers = build_optimizers(self.model, tcfg)
        self.grad_filter = GradFilter.from_config(tcfg)
        self.data_rng = torch.Generator().manual_seed(tcfg.seed)
        self.seed_search = SeedSearch(self.model, tcfg.seed_search_candidates, tcfg.seed + 1,
                                      tcfg.seed_search_margin)
        if tcfg.seed_search_every and not self.seed_search:
            raise UserError("train.seed_search_every is set but the model has no seeded modules "
                            "(use model.linear.kind=seeded or a seeded feed-forward)")
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.timed_tokens, self.warmup_seconds = 0, 0.0  # tokens trained in timed steps; warm-up time
        self.last_val_bpb = float("nan")
        self.val_bpb_cache: float | None = None
        if self.checkpoint is not None:
            self.restore(*self.checkpoint)
            self.checkpoint = None
        self.forward_model = torch.compile(self.model) if tcfg.compile else self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.forward_model = DistributedDataParallel(self.forward_model)
        self.flops_per_token = training_flops_per_token(self.model, context, tcfg.batch_size)
        self.peak = matmul_peak(self.device, self.autocast_dtype or torch.float32)
        if self.dist.main:
            self.write_run_files(resume)

    # -- run folder -------------------------------------------------------------------
    def write_run_files(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", self.cfg.to_toml())
        proto = self.data.tokenizer.model_proto
        if proto is not None:
            atomic_write_bytes(self.run_dir / "tokenizer.model", proto)
        metrics = self.run_dir / "metrics.jsonl"
        if resume and metrics.exists():
            # Drop what the interrupted run logged after its last checkpoint.
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        elif not resume:
            atomic_write_text(metrics, "")

    def log(self, record: dict) -> None:
        if self.dist.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        if not self.dist.main:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, groups = optimizer_tensors(self.optimizers)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.data_rng.get_state()
        tensors.update(self.seed_search.state())
        tensors.update(self.grad_filter.state())
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                "timed_tokens": self.timed_tokens, "warmup_seconds": self.warmup_seconds,
                "last_val_bpb": self.last_val_bpb, "world": self.dist.world, "optimizer_groups": groups,
                "config": self.cfg.to_dict()}
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, tensors, meta)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint does not fit the model (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]}); was the config changed?")
        restore_optimizers(self.optimizers, tensors, meta["optimizer_groups"])
        torch.set_rng_state(tensors["rng.torch"])
        self.data_rng.set_state(tensors["rng.data"])
        self.seed_search.restore(tensors)
        self.grad_filter.restore(tensors, self.device)
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.train_seconds, self.last_val_bpb = meta["train_seconds"], meta["last_val_bpb"]
        self.timed_tokens, self.warmup_seconds = meta["timed_tokens"], meta["warmup_seconds"]

    # -- the loop ---------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows; every rank draws the same offsets and keeps its own slice."""
        tcfg, context = self.cfg.train, self.cfg.model.max_seq_len
        offsets = torch.randint(0, len(self.train_tokens) - context - 1,
                                (tcfg.batch_size * self.dist.world,), generator=self.data_rng)
        offsets = offsets[self.dist.rank * tcfg.batch_size:(self.dist.rank + 1) * tcfg.batch_size]
        positions = offsets.to(self.device)[:, None] + self.window
        windows = self.train_tokens[positions].long()
        targets = windows[:, 1:]
        if self.trained_targets is not None:
            targets = targets.masked_fill(~self.trained_targets[positions[:, 1:]], IGNORED_TARGET)
        return windows[:, :-1], targets

    def progress_fraction(self) -> float:
        tcfg = self.cfg.train
        if tcfg.steps:
            return self.step / tcfg.steps
        return self.train_seconds / (tcfg.minutes * 60)

    def done(self) -> bool:
        return self.progress_fraction() >= 1.0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> float:
        tcfg = self.cfg.train
        multiplier = lr_multiplier(self.progress_fraction(), self.step, tcfg)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
        total = torch.zeros((), device=self.device)
        for micro in range(tcfg.grad_accum):
            inputs, targets = self.batch()
            sync = micro == tcfg.grad_accum - 1 or self.dist.world == 1
            no_sync = self.forward_model.no_sync if not sync else nullcontext
            with no_sync():
                with self.autocast():
                    logits = self.forward_model(inputs)
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                # Auxiliary losses (MoE balance, depth routing) and early exits train the model but stay out
                # of the logged loss.
                (self.model.objective(loss, targets) / tcfg.grad_accum).backward()
            total += loss.detach() / tcfg.grad_accum
        if self.dist.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss became {loss_value} at step {self.step + 1}; the last good "
                                   f"checkpoint in {self.run_dir} is left intact (try a lower train.lr / train.matrix_lr)")
        # Grokfast after the all-reduce (every rank filters the same gradients), before clipping.
        self.grad_filter.apply(self.model.named_parameters())
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tcfg.batch_size * tcfg.grad_accum * self.cfg.model.max_seq_len * self.dist.world
        if tcfg.seed_search_every and self.step % tcfg.seed_search_every == 0:
            self.search_seeds()
        return loss_value

    def search_seeds(self) -> None:
        """One round of gradient-free seed search (see train/seed_search.py): proposals are ranked
        on one fresh batch, and the best is kept only if it also wins on a second, independent one."""

        def scorer(inputs: torch.Tensor, targets: torch.Tensor):
            def score() -> torch.Tensor:
                with self.autocast():
                    logits = self.model(inputs)
                # One loss per sequence: the acceptance test weighs the gain against their spread.
                return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            return score

        outcome = self.seed_search.step(scorer(*self.batch()), scorer(*self.batch()))
        self.log({"step": self.step, "seed_search": outcome.module, "select_before": outcome.select_before,
                  "select_best": outcome.select_best, "accept_before": outcome.accept_before,
                  "accept_best": outcome.accept_best, "accept_stderr": outcome.accept_stderr,
                  "accepted": outcome.accepted})

    def evaluate(self, max_tokens: int = 0):
        """val bpb (and, on modular data, answer accuracy); a partial eval (``max_tokens``) runs in the
        training dtype, the full one in fp32, so the final number is the one ``seedbed eval`` reproduces."""
        split = self.data.val
        tokens = split.tokens if not max_tokens else split.tokens[:max_tokens]
        n_bytes = split.n_bytes if len(tokens) == len(split.tokens) else len(self.data.tokenizer.decode(tokens))
        answers = None
        if split.answers is not None:
            answers = split.answers[:len(tokens)].copy()
            if len(tokens) < len(split.tokens) and split.answers[len(tokens)] >= 0:
                answers[answers == split.answers[len(tokens)]] = -1  # an equation cut in two is not counted
        return evaluate_bpb(self.model, tokens, n_bytes, self.cfg.model.max_seq_len, self.cfg.train.eval_stride,
                            batch_size=self.cfg.train.batch_size, device=self.device,
                            autocast_dtype=self.autocast_dtype if max_tokens else None, answers=answers)

    def answer_record(self, result) -> dict:
        """``val_answer_accuracy`` for the metrics, on modular data."""
        if self.data.val.answers is None:
            return {}
        return {"val_answer_accuracy": result.answer_accuracy, "val_answers": result.answers_total}

    def initialise_from(self, source: str) -> None:
        """Copy a trained model's weights into this one (``train.init_from``), after checking that
        it is the same model on the same tokenizer: anything else would train from a wrong start."""
        from seedbed.runs import load

        seed = load(source)
        if not isinstance(seed.model, LM) or without_adapters(seed.model.cfg) != without_adapters(self.model.cfg):
            raise UserError(f"train.init_from: {source} is not this run's model (its [model] config differs)")
        if seed.tokenizer.model_proto != self.data.tokenizer.model_proto:
            raise UserError(f"train.init_from: {source} was trained with another tokenizer than this run's")
        # Adapters this run adds (LoRA fine-tuning) start fresh; every other tensor is the seed's.
        missing, unexpected = self.model.load_state_dict(seed.model.state_dict(), strict=False)
        if unexpected or any(not is_adapter(name) for name in missing):
            raise UserError(f"train.init_from: {source} does not fit this run's model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def sync_clock(self) -> None:
        """All ranks follow rank 0's clock, so they agree on the lr and on when to stop."""
        if self.dist.world > 1:
            clock = torch.tensor([self.train_seconds], dtype=torch.float64)
            dist.broadcast(clock, 0)
            self.train_seconds = clock.item()

    def run(self) -> TrainResult:
        tcfg = self.cfg.train
        total = tcfg.steps or tcfg.minutes * 60
        bar = tqdm(total=total, initial=self.step if tcfg.steps else self.train_seconds, disable=not self.progress,
                   unit="step" if tcfg.steps else "s", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
        bytes_per_token = self.data.train.n_bytes / max(1, len(self.data.train.tokens))
        last_eval = last_save = time.perf_counter()
        window_tokens, window_seconds = 0, 0.0
        warmup_left = COMPILE_WARMUP_STEPS if tcfg.compile else 1
        while not self.done():
            t0 = time.perf_counter()
            tokens_before = self.tokens_seen
            loss = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if warmup_left:
                warmup_left -= 1
                self.warmup_seconds += elapsed
                elapsed = 0.0
            else:
                self.train_seconds += elapsed
                self.timed_tokens += self.tokens_seen - tokens_before
                window_tokens += self.tokens_seen - tokens_before
                window_seconds += elapsed
            self.sync_clock()
            bar.update(1 if tcfg.steps else min(elapsed, max(0.0, total - bar.n)))
            if (self.step % tcfg.log_every == 0 or self.done()) and window_seconds > 0:
                tok_s = window_tokens / window_seconds
                # With the loss on answers only, bits per byte would be a wrong name for it.
                loss_record = {"train_answer_bits": loss / math.log(2)} if self.trained_targets is not None \
                    else {"train_bpb": loss / math.log(2) / bytes_per_token}
                record = {"step": self.step, "train_loss": loss, **loss_record,
                          "lr_mult": lr_multiplier(self.progress_fraction(), self.step, tcfg),
                          "tokens": self.tokens_seen, "train_seconds": round(self.train_seconds, 3),
                          "warmup_seconds": round(self.warmup_seconds, 3),
                          "tokens_per_second": tok_s, "mfu": self.mfu(tok_s), **routing_metrics(self.model),
                          **depth_routing_metrics(self.model)}
                self.log(record)
                val = "-" if math.isnan(self.last_val_bpb) else f"{self.last_val_bpb:.3f}"
                bar.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s | val bpb {val}")
                window_tokens, window_seconds = 0, 0.0
            now = time.perf_counter()
            eval_due = (self.step % tcfg.eval_every_steps == 0 if tcfg.eval_every_steps
                        else now - last_eval >= tcfg.eval_every_seconds)
            if eval_due and not self.done():
                self.periodic_eval()
                last_eval = time.perf_counter()
            if (tcfg.checkpoint_every_steps and self.step % tcfg.checkpoint_every_steps == 0) or \
                    (not tcfg.checkpoint_every_steps and now - last_save >= tcfg.checkpoint_every_seconds):
                self.save()
                last_save = time.perf_counter()
        bar.close()
        return self.finish()

    def periodic_eval(self) -> None:
        if self.dist.main:
            result = self.evaluate(self.cfg.train.eval_tokens)
            self.last_val_bpb = result.bpb
            self.log({"step": self.step, "val_bpb_partial": result.bpb, "val_tokens": result.tokens,
                      **self.answer_record(result), "train_seconds": round(self.train_seconds, 3)})
        if self.dist.world > 1:
            dist.barrier()

    def build_cache(self) -> TextCache | None:
        """The n-gram cache of the whole training stream (``cachemix.py``), written to the run folder.

        Counted once, after training, in one pass over the split: exact counts of the text, which
        counting the trainer's sampled windows (overlapping, some text twice, some never) would not
        give. Under torchrun each rank counts its share of the stream (with the ``orders`` tokens
        before it as context) and rank 0 merges them, equal to counting the whole in one process.
        """
        ccfg = self.cfg.cache
        start = time.perf_counter()
        tokens = np.asarray(self.data.train.tokens, np.int64)
        bounds = np.linspace(0, len(tokens), self.dist.world + 1).astype(np.int64)
        lo, hi = int(bounds[self.dist.rank]), int(bounds[self.dist.rank + 1])
        first = max(0, lo - ccfg.orders)
        mine = NgramCache.count(tokens[first:hi], self.cfg.model.vocab_size, ccfg.orders, ccfg.smoothing,
                                ccfg.discount, context=lo - first)
        parts = [mine] if self.dist.world == 1 else gather_caches(mine, self.device)
        count_seconds = time.perf_counter() - start
        if not self.dist.main:
            return None
        start = time.perf_counter()
        cache = build_text_cache(self.model, tokens, self.cfg.model.vocab_size, ccfg.orders, fit_tokens=ccfg.fit_tokens,
                                 stride=self.cfg.train.eval_stride, batch_size=self.cfg.train.batch_size,
                                 ngram=NgramCache.merged(parts), device=self.device)
        blob = cache.to_bytes()
        atomic_write_bytes(self.run_dir / CACHE_FILE, blob)
        self.log({"step": self.step, "cache_count_seconds": round(count_seconds, 3),
                  "cache_fit_seconds": round(time.perf_counter() - start, 3), "cache_bytes": len(blob),
                  "cache_orders": ccfg.orders})
        return cache

    def mfu(self, tokens_per_second: float) -> float | None:
        if not self.peak:
            return None
        return tokens_per_second * self.flops_per_token / self.peak / self.dist.world

    def check_ranks_in_sync(self) -> bool:
        """Every rank must hold bit-identical weights; returns True on one process."""
        if self.dist.world == 1:
            return True
        checksum = torch.tensor([sum(float(p.double().sum()) for p in self.model.parameters())], dtype=torch.float64)
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def finish(self) -> TrainResult:
        in_sync = self.check_ranks_in_sync()
        if not in_sync:
            raise RuntimeError("ranks diverged: their weights differ after training")
        val_bpb, accuracy = float("nan"), None
        cache = self.build_cache() if self.cfg.cache.orders else None
        if self.dist.main:
            result = self.evaluate()
            val_bpb = self.last_val_bpb = result.bpb
            accuracy = result.answer_accuracy if self.data.val.answers is not None else None
            tok_s = self.timed_tokens / max(self.train_seconds, 1e-9)
            self.log({"step": self.step, "val_bpb": val_bpb, **self.answer_record(result),
                      "val_tokens": result.tokens, "val_bytes": result.n_bytes,
                      "tokens_per_second_mean": tok_s, "mfu_mean": self.mfu(tok_s), "ranks_in_sync": in_sync,
                      "train_seconds": self.train_seconds, "warmup_seconds": self.warmup_seconds,
                      "world": self.dist.world, "params": count_parameters(self.model)})
            if cache is not None:
                with_cache = evaluate_bpb(self.model, self.data.val.tokens, self.data.val.n_bytes,
                                          self.cfg.model.max_seq_len, self.cfg.train.eval_stride,
                                          batch_size=self.cfg.train.batch_size, device=self.device, cache=cache)
                self.val_bpb_cache = with_cache.bpb
                self.log({"step": self.step, "val_bpb_cache": with_cache.bpb})
            self.save()
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curve.png")
        if self.dist.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        tok_s = self.timed_tokens / max(self.train_seconds, 1e-9)
        return TrainResult(self.run_dir, self.step, self.tokens_seen, self.train_seconds, self.warmup_seconds,
                           val_bpb, tok_s, self.mfu(tok_s), count_parameters(self.model), accuracy,
                           self.val_bpb_cache)


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_down", "lora_up")


def without_adapters(cfg) -> dict:
    """The model config with every linear spec's ``lora_rank`` removed: what a LoRA fine-tune must share
    with its base. A component spec is a dict with a ``kind``; a block's own ``lora_rank`` (per-use
    LoRA of shared parts, Zamba2) is part of the model and stays."""

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(inner) for key, inner in value.items() if not (key == "lora_rank" and "kind" in value)}
        if isinstance(value, list):
            return [strip(inner) for inner in value]
        return value
    return strip(dataclasses.asdict(cfg))


def freeze_all_but_adapters(model: torch.nn.Module) -> None:
    """``train.trainable = lora``: only the LoRA adapters take gradients."""
    adapters = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))
        adapters += is_adapter(name)
    if not adapters:
        raise UserError("train.trainable=lora needs LoRA adapters: set model.linear.lora_rank (bitlinear linears)")


def gather_caches(mine: NgramCache, device: torch.device) -> list[NgramCache]:
    """Every rank's cache, on every rank: their bytes all-gathered (padded to the longest)."""
    blob = torch.frombuffer(bytearray(mine.to_bytes()), dtype=torch.uint8).to(device)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(blob)], dtype=torch.int64, device=device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(blob)] = blob
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [NgramCache.from_bytes(bytes(g[:int(size.item())].cpu().numpy()), "a rank's n-gram cache")
            for g, size in zip(gathered, sizes, strict=True)]
