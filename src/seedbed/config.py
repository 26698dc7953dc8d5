"""Run configuration: dataclasses, loaded from a preset or TOML file, overridden by key=value.

A run config has three sections, ``model``, ``data`` and ``train``. Component options
(``model.mixer``, ``model.ffn``) are tables whose ``kind`` picks a registered component;
their other keys are checked against that component's ``Options``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from seedbed.errors import UserError
from seedbed.registry import build_dataclass, require


SHARES = ("none", "ffn", "mixer", "block")
BLOCK_INPUTS = ("hidden", "hidden+embedding")
SCOPES = ("global", "local")
GROKFAST_KINDS = ("none", "ema", "ma")  # train.grokfast: train/grokfast.py
# A block every plan may name without defining it: attention + MLP at the model's linear and norm
# kinds (what an hourglass's inner plan runs unless told otherwise). ``blocks.transformer`` overrides it.
BUILTIN_BLOCKS = {"transformer": {"mixer": {"kind": "attention"}, "ffn": {"kind": "mlp"}}}


@dataclass
class BlockConfig:
    """One named kind of block in the layer stack (``model.blocks.NAME``); unset parts use the model's."""

    mixer: dict[str, Any] | None = None  # {kind = "none"}: no mixer
    ffn: dict[str, Any] | None = None  # {kind = "none"}: no feed-forward (Mamba's blocks)
    linear: dict[str, Any] | None = None
    norm: dict[str, Any] | None = None
    # Which parts are one set of parameters for every depth that uses this block:
    # none | ffn | mixer | block (mixer, feed-forward and input projection).
    share: str = "none"
    lora_rank: int = 0  # per-use LoRA of this rank on every linear of the shared parts (Zamba2)
    use_scale: bool = False  # per-use learned gains on the mixer's and the feed-forward's outputs
    depth_embedding: bool = False  # per-use learned vector added to the residual stream first (Universal Transformer)
    input: str = "hidden"  # hidden | hidden+embedding: the mixer reads W [norm(h); norm(embedding)] (Zamba)
    # global | local: inside an hourglass, a local block runs over the latents of one group at a time.
    scope: str = "global"
    # Mixture of depths (model/depths.py): {capacity = 0.125, ...} runs the block on a routed fraction
    # of the tokens only; {} (the default) on every token.
    mixture_of_depths: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        require(self.share in SHARES, f"{where}.share must be one of {', '.join(SHARES)}, got {self.share!r}")
        require(self.input in BLOCK_INPUTS,
                f"{where}.input must be one of {', '.join(BLOCK_INPUTS)}, got {self.input!r}")
        require(self.scope in SCOPES, f"{where}.scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        require(self.lora_rank >= 0, f"{where}.lora_rank must be >= 0, got {self.lora_rank}")
        require(self.lora_rank == 0 or self.share != "none",
                f"{where}.lora_rank adapts shared parameters: set {where}.share too")
        for part in ("mixer", "ffn", "linear", "norm"):
            spec = getattr(self, part)
            require(spec is None or "kind" in spec, f"{where}.{part} needs a 'kind'")


@dataclass
class ModelConfig:
    vocab_size: int = 256  # set from the tokenizer when training
    d_model: int = 256
    n_layers: int = 6
    max_seq_len: int = 256  # context length the model is trained and evaluated at
    mixer: dict[str, Any] = field(default_factory=lambda: {"kind": "attention"})
    ffn: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp"})
    linear: dict[str, Any] = field(default_factory=lambda: {"kind": "dense"})
    norm: dict[str, Any] = field(default_factory=lambda: {"kind": "rmsnorm"})
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # 0 disables; else logits = c * tanh(logits / c)
    embed_init_std: float = 0.02
    # Keep no generated weights between uses and checkpoint each block, so that only the
    # running block's weights exist (GERMINATOR layer streaming); costs regeneration time.
    stream_layers: bool = False
    # The layer stack. Every depth runs the default block (the fields above, plus
    # ``blocks.default`` if given) unless ``pattern`` (names, "name*k" for k in a row; cycled
    # to n_layers) or ``depths`` (depth index -> name) picks a named block from ``blocks``.
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    pattern: list[str] = field(default_factory=list)
    depths: dict[str, str] = field(default_factory=dict)
    # Denseformer depth-weighted averages over the stack's depths (model/denseformer.py):
    # {dilation = 1, period = 1}; dilation 0 (the default, {}) turns them off.
    denseformer: dict[str, Any] = field(default_factory=dict)
    # LayerSkip (model/layerskip.py), training only: the last depth's layer-dropout rate (earlier
    # depths less), and the scale of the early-exit losses through the shared head.
    layer_dropout: float = 0.0
    early_exit_loss: float = 0.0

    def check(self, where: str) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            require(getattr(self, name) > 0, f"{where}.{name} must be positive, got {getattr(self, name)}")
        for name, spec in self.blocks.items():
            require(name.isidentifier(), f"{where}.blocks: block name {name!r} must be a plain identifier")
            require(isinstance(spec, dict), f"{where}.blocks.{name} must be a table")
            build_dataclass(BlockConfig, spec, f"{where}.blocks.{name}")
        self.layer_plan(where)
        denseformer_options(self.denseformer, f"{where}.denseformer")
        require(self.logit_softcap >= 0, f"{where}.logit_softcap must be >= 0")
        require(self.embed_init_std > 0, f"{where}.embed_init_std must be positive")
        require(0 <= self.layer_dropout < 1, f"{where}.layer_dropout must be in [0, 1), got {self.layer_dropout}")
        require(self.early_exit_loss >= 0, f"{where}.early_exit_loss must be >= 0, got {self.early_exit_loss}")

    def known_block(self, name: str, key: str) -> str:
        known = set(self.blocks) | {"default"} | set(BUILTIN_BLOCKS)
        require(name in known, f"{key}: unknown block {name!r} (known: {', '.join(sorted(known))})")
        return name

    def expand_pattern(self, items: list[str], key: str) -> list[str]:
        """Block names from a pattern: each item a name, or name*count for count in a row."""
        names = []
        for item in items:
            name, _, count = item.partition("*")
            require(count == "" or (count.isdigit() and int(count) > 0),
                    f"{key}: {item!r} must be a block name or name*count")
            names += [self.known_block(name.strip(), key)] * (int(count) if count else 1)
        return names

    def layer_plan(self, where: str = "model") -> list[str]:
        """The block name at every depth, from ``pattern`` and ``depths``."""
        cycle = self.expand_pattern(self.pattern, f"{where}.pattern")
        require(not cycle or self.n_layers % len(cycle) == 0,
                f"{where}.pattern covers {len(cycle)} layers, which does not divide n_layers={self.n_layers}")
        plan = (cycle or ["default"]) * (self.n_layers // max(1, len(cycle)))
        for depth, name in self.depths.items():
            require(str(depth).isdigit() and int(depth) < self.n_layers,
                    f"{where}.depths: {depth!r} is not a depth in 0..{self.n_layers - 1}")
            plan[int(depth)] = self.known_block(name, f"{where}.depths.{depth}")
        return plan

    def block(self, name: str) -> BlockConfig:
        """The named block with every unset part filled from the model's defaults."""
        values = self.blocks.get(name, BUILTIN_BLOCKS.get(name, {}))
        spec = build_dataclass(BlockConfig, values, f"model.blocks.{name}")
        for part in ("mixer", "ffn", "linear", "norm"):
            if getattr(spec, part) is None:
                setattr(spec, part, getattr(self, part))
        return spec


@dataclass
class DenseformerOptions:
    dilation: int = 0  # average over depths i, i - dilation, i - 2 dilation, ...; 0: no averaging
    period: int = 1  # average after every period-th depth only

    def check(self, where: str) -> None:
        require(self.dilation >= 0, f"{where}.dilation must be >= 0, got {self.dilation}")
        require(self.period > 0, f"{where}.period must be positive, got {self.period}")


def denseformer_options(values: dict[str, Any], where: str) -> DenseformerOptions:
    return build_dataclass(DenseformerOptions, values, where)


@dataclass
class DataConfig:
    spec: str = "default"  # default | pystdlib | modular:P[:F] | PATH | shards:DIR
    tokenizer: str = "bytes"  # bytes | sp | sp:PATH
    vocab_size: int = 1024  # for a SentencePiece tokenizer trained on the train split

    def check(self, where: str) -> None:
        require(self.vocab_size > 0, f"{where}.vocab_size must be positive")


@dataclass
class CacheConfig:
    """The n-gram cache counted over the training stream after training (``cachemix.py``)."""
    orders: int = 0  # longest context in tokens; 0: no cache
    smoothing: str = "witten-bell"  # witten-bell | absolute
    discount: float = 0.75  # absolute discounting's D
    fit_tokens: int = 65536  # positions at the end of the training stream the gate is fitted on

    def check(self, where: str) -> None:
        require(0 <= self.orders <= 16, f"{where}.orders must be in 0..16, got {self.orders}")
        require(self.smoothing in ("witten-bell", "absolute"),
                f"{where}.smoothing must be witten-bell or absolute, got {self.smoothing!r}")
        require(0 < self.discount <= 1, f"{where}.discount must be in (0, 1], got {self.discount}")
        require(self.fit_tokens > 0, f"{where}.fit_tokens must be positive, got {self.fit_tokens}")


@dataclass
class TrainConfig:
    seed: int = 1337
    batch_size: int = 16  # sequences of model.max_seq_len tokens per micro-batch per process
    grad_accum: int = 1
    steps: int = 0  # 0: train for `minutes` instead
    minutes: float = 0.0
    optimizer: str = "muon"  # muon | adamw
    lr: float = 3e-3  # AdamW: embeddings, norms, scalars (all parameters with adamw)
    matrix_lr: float = 0.02  # Muon: hidden weight matrices
    momentum: float = 0.95  # Muon momentum
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "warmdown"  # cosine | warmdown | constant
    warmdown_frac: float = 0.4  # warmdown: last fraction of training decays linearly to 0
    min_lr_frac: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: OMP_NUM_THREADS if set, else all cores shared between local processes
    eval_every_seconds: float = 60.0
    eval_every_steps: int = 0  # 0: evaluate every eval_every_seconds; else every this many steps
    eval_tokens: int = 65536  # val tokens scored by the periodic eval (0: the whole split)
    eval_stride: int = 0  # sliding-window stride for eval; 0: max_seq_len // 2
    checkpoint_every_seconds: float = 60.0
    checkpoint_every_steps: int = 0  # 0: by time only
    log_every: int = 10
    seed_search_every: int = 0  # gradient-free search over seeded modules every N steps; 0: seeds stay frozen
    seed_search_candidates: int = 4
    seed_search_margin: float = 2.0  # accept a proposal only if it wins by this many standard errors
    # Grokfast (train/grokfast.py): add lamb x a low-pass filter of the gradients to them before
    # clipping and the step; ema: e <- alpha e + (1 - alpha) g; ma: the mean of the last window.
    grokfast: str = "none"  # none | ema | ma
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    grokfast_window: int = 100
    # What the training loss averages over: every next token, or (modular:P data) only the answer
    # tokens, as grokking was studied; evaluation scores every token either way.
    loss_on: str = "all"  # all | answers
    # A run folder or artifact whose weights start this run (a branch of a seed model, as in
    # Branch-Train-Merge); its model must be this run's model and its tokenizer this run's.
    init_from: str = ""
    # all | lora: train only the LoRA adapters (``model.linear.lora_rank``), every other weight frozen:
    # what ``seedbed train --from ARTIFACT`` sets to fine-tune a packed model on a user's text.
    trainable: str = "all"

    def check(self, where: str) -> None:
        for name in ("batch_size", "grad_accum", "log_every"):
            require(getattr(self, name) > 0, f"{where}.{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "minutes", "lr", "matrix_lr", "warmup_steps", "grad_clip",
                     "weight_decay", "eval_tokens", "eval_stride", "threads", "checkpoint_every_steps",
                     "seed_search_every", "eval_every_steps", "grokfast_lamb"):
            require(getattr(self, name) >= 0, f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        require(self.seed_search_candidates > 0, f"{where}.seed_search_candidates must be positive")
        require(self.seed_search_margin >= 0, f"{where}.seed_search_margin must be >= 0")
        require(self.eval_every_seconds > 0, f"{where}.eval_every_seconds must be positive")
        require(self.checkpoint_every_seconds > 0, f"{where}.checkpoint_every_seconds must be positive")
        require(self.optimizer in ("muon", "adamw"), f"{where}.optimizer must be muon or adamw, got {self.optimizer!r}")
        require(self.schedule in ("cosine", "warmdown", "constant"),
                f"{where}.schedule must be cosine, warmdown or constant, got {self.schedule!r}")
        require(self.trainable in ("all", "lora"), f"{where}.trainable must be all or lora, got {self.trainable!r}")
        require(self.dtype in ("auto", "fp32", "bf16"), f"{where}.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        require(self.device in ("auto", "cpu", "cuda"), f"{where}.device must be auto, cpu or cuda, got {self.device!r}")
        require(0 <= self.warmdown_frac <= 1, f"{where}.warmdown_frac must be in [0, 1]")
        require(0 <= self.min_lr_frac <= 1, f"{where}.min_lr_frac must be in [0, 1]")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{where}.beta1 and beta2 must be in [0, 1)")
        require(0 <= self.momentum < 1, f"{where}.momentum must be in [0, 1)")
        require(self.grokfast in GROKFAST_KINDS,
                f"{where}.grokfast must be none, ema or ma, got {self.grokfast!r}")
        require(0 <= self.grokfast_alpha < 1, f"{where}.grokfast_alpha must be in [0, 1), got {self.grokfast_alpha}")
        require(self.grokfast_window > 0, f"{where}.grokfast_window must be positive, got {self.grokfast_window}")
        require(self.loss_on in ("all", "answers"), f"{where}.loss_on must be all or answers, got {self.loss_on!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# What ``seedbed train --resume RUN key=value`` may change: how long and how fast to train,
# how often to evaluate and checkpoint, and how to run. Everything else (the model's shape,
# the data and tokenizer, the batch, the seed) is fixed by the checkpoint.
RESUMABLE_TRAIN_KEYS = frozenset({
    "steps", "minutes", "lr", "matrix_lr", "momentum", "beta1", "beta2", "weight_decay", "warmup_steps",
    "schedule", "warmdown_frac", "min_lr_frac", "grad_clip", "dtype", "compile", "device", "threads",
    "eval_every_seconds", "eval_tokens", "eval_stride", "checkpoint_every_seconds", "checkpoint_every_steps",
    "log_every", "seed_search_every", "seed_search_candidates", "seed_search_margin", "eval_every_steps",
    # Grokfast may be switched on, off or over mid-run: a new kind or window starts its state afresh.
    "grokfast", "grokfast_alpha", "grokfast_lamb", "grokfast_window"})


def check_resume_config(saved: dict[str, Any], cfg: RunConfig, skip: frozenset[str] = frozenset()) -> None:
    """Refuse, naming the key, a resumed config that differs from the checkpoint's where it cannot
    (keys in ``skip``, written ``section.key``, are left for a later check)."""
    new = cfg.to_dict()
    for section in SECTIONS:
        for key in sorted(set(saved.get(section, {})) | set(new[section])):
            # The cache is counted after training: any of its settings may change at a resume.
            if (section == "train" and key in RESUMABLE_TRAIN_KEYS) or section == "cache" \
                    or f"{section}.{key}" in skip:
                continue
            before, after = saved.get(section, {}).get(key), new[section].get(key)
            if before != after:
                raise UserError(f"cannot resume with {section}.{key}={after!r}: the checkpoint was trained "
                                f"with {before!r}, and {section}.{key} cannot change mid-run")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "cache": CacheConfig}


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and check a RunConfig; unknown sections or keys are errors naming the key."""
    values = dict(values)
    preset = values.pop("preset", "")
    sections = {}
    for name, value in values.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section {name!r} (valid: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise UserError(f"config section {name!r} must be a table")
        sections[name] = value
    built = {name: build_dataclass(cls, sections.get(name, {}), name) for name, cls in SECTIONS.items()}
    return RunConfig(preset=str(preset), **built)


def preset_names() -> list[str]:
    folder = resources.files("seedbed") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file."""
    text = (resources.files("seedbed") / "presets" / f"{name}.toml").read_text()
    return next((line.lstrip("# ") for line in text.splitlines() if line.startswith("#")), "")


def read_preset(name: str) -> dict[str, Any]:
    path = resources.files("seedbed") / "presets" / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r} (available: {', '.join(preset_names())})")
    values = tomllib.loads(path.read_text())
    values["preset"] = name
    return values


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are TOML literals (bare words are strings)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.003")
        path, raw = item.split("=", 1)
        set_value(values, path, parse_value(raw.strip()))
    return values


def set_value(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set the dotted ``section.key`` in a nested config dict, creating tables on the way."""
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise UserError(f"override key {path!r} must name a section and a key, e.g. model.d_model")
    target = values
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise UserError(f"override {path!r}: {key} is not a table")
    target[keys[-1]] = value
    return values


def parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   overrides: list[str] | None = None) -> RunConfig:
    if preset and config_file:
        raise UserError("give either --preset or --config, not both")
    values = read_config_file(config_file) if config_file else read_preset(preset or "gpt")
    return config_from_dict(apply_overrides(values, overrides or []))
