"""A sweep file: the trials ``seedbed sweep`` runs, read and checked before any of them starts.

::

    [sweep]
    preset = "gpt"             # the base of every trial (or config = "base.toml", beside the sweep file)
    minutes = 2.0              # each trial's training budget (or steps = N)
    seeds = [1, 2, 3]          # every configuration runs once per seed (train.seed)
    quant = "int8"             # how trials are packed (pack --quant); a configuration may set its own
    set = { "train.eval_tokens" = 32768 }   # settings every trial shares

    [[configs]]                # a configuration, or a grid of them
    name = "kan"
    preset = "mixkabrn"        # optional: its own base instead of [sweep]'s
    set = { "model.ffn" = { kind = "kan", basis = "rbf" } }
    grid = { "model.ffn.grid_size" = [4, 8] }   # every combination: kan[grid_size=4], kan[grid_size=8]

    [search]                   # instead of configs: Optuna chooses the settings
    trials = 20
    sampler = "tpe"            # tpe | random
    pruner = "median"          # none | median: stop a trial whose val bpb at an evaluation is worse
                               # than the median of earlier trials' at the same evaluation
    space = { "train.matrix_lr" = { low = 0.005, high = 0.1, log = true }, "model.mixer.n_heads" = [1, 2, 4] }

A setting is a dotted config key and a TOML value, as ``seedbed train``'s KEY=VALUE overrides.
Settings apply in order: the base, [sweep].set, the configuration's set, its grid point, and
last the sweep's own train.seed and budget (which a configuration may not set).

What is wrong with the file as a whole (no [sweep], an unknown key, nothing to run) is an
error before anything runs. What is wrong with one configuration (an empty grid, an unknown
config key, a value out of range) is that configuration's trials' error: they are recorded
as failed with its message, and the rest of the sweep runs.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seedbed.config import config_from_dict, read_config_file, read_preset, set_value
from seedbed.errors import UserError

SWEEP_KEYS = {"preset", "config", "minutes", "steps", "seeds", "quant", "set", "name"}
CONFIG_KEYS = {"name", "set", "grid", "quant", "preset"}
SEARCH_KEYS = {"trials", "sampler", "pruner", "space", "seed"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median")
SET_BY_THE_SWEEP = ("train.seed", "train.minutes", "train.steps")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class PlannedTrial:
    """One configuration at one seed: ``key`` names it across runs, workers and resumes."""
    key: str
    config: str  # the configuration's label, shared by its seeds
    seed: int
    settings: dict[str, Any]
    quant: str
    preset: str = ""  # its own base preset ('': the sweep's base)
    error: str = ""  # why this trial cannot run (recorded as failed, without running)

    def attrs(self) -> dict[str, Any]:
        """What the study stores of it (Optuna user attributes: JSON values)."""
        return {"key": self.key, "config": self.config, "seed": self.seed, "quant": self.quant,
                "preset": self.preset, "settings": json.dumps(self.settings, sort_keys=True)}


@dataclass
class Search:
    trials: int
    sampler: str
    pruner: str
    space: dict[str, Any]  # key -> list (categorical) or {low, high, log, step}
    seed: int | None = None


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # the base config dict (a preset or a config file)
    budget: dict[str, Any]  # train.minutes / train.steps
    seeds: list[int]
    quant: str
    shared: dict[str, Any]
    planned: list[PlannedTrial] = field(default_factory=list)
    search: Search | None = None

    def trial_config(self, settings: dict[str, Any], seed: int, preset: str = "") -> dict[str, Any]:
        """The full config dict of a trial: base, settings, then the sweep's seed and budget."""
        values = read_preset(preset) if preset else copy.deepcopy(self.base)
        for key, value in {**self.shared, **settings}.items():
            set_value(values, key, copy.deepcopy(value))
        for key, value in {"train.seed": seed, **self.budget}.items():
            set_value(values, key, value)
        return values

    def check_trial(self, settings: dict[str, Any], seed: int, preset: str = "") -> str:
        """'' if these settings make a valid config, else the config's own error message."""
        try:
            config_from_dict(self.trial_config(settings, seed, preset))
        except UserError as err:
            return str(err)
        return ""


def read_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"sweep file {path} is not valid TOML: {err}") from None
    return parse_sweep(values, path)


def parse_sweep(values: dict[str, Any], path: Path) -> SweepSpec:
    where = str(path)
    unknown_tables = sorted(set(values) - {"sweep", "configs", "search"})
    if unknown_tables:
        raise UserError(f"{where}: unknown table {unknown_tables[0]!r} (valid: sweep, configs, search)")
    sweep = table(values.get("sweep"), f"{where}: [sweep]", SWEEP_KEYS, required=True)
    require(("preset" in sweep) != ("config" in sweep), f"{where}: [sweep] needs exactly one of preset or config")
    base = read_preset(sweep["preset"]) if "preset" in sweep else read_config_file(path.parent / sweep["config"])
    require(("minutes" in sweep) != ("steps" in sweep),
            f"{where}: [sweep] needs exactly one of minutes or steps (each trial's training budget)")
    if "minutes" in sweep:
        minutes = sweep["minutes"]
        require(isinstance(minutes, (int, float)) and minutes > 0, f"{where}: [sweep].minutes must be positive")
        budget = {"train.minutes": float(minutes), "train.steps": 0}
    else:
        steps = sweep["steps"]
        require(isinstance(steps, int) and steps > 0, f"{where}: [sweep].steps must be a positive integer")
        budget = {"train.steps": steps, "train.minutes": 0.0}
    seeds = sweep.get("seeds", [1337])
    require(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds), f"{where}: [sweep].seeds must be a list of distinct integers >= 0")
    quant = sweep.get("quant", "int8")
    require(isinstance(quant, str) and quant, f"{where}: [sweep].quant must be a string such as \"int8\"")
    name = sweep.get("name", path.stem)
    require(isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None,
            f"{where}: [sweep].name must be letters, digits and _.+-, got {name!r}")
    shared = settings_table(sweep.get("set", {}), f"{where}: [sweep].set")
    spec = SweepSpec(name, base, budget, seeds, quant, shared)
    configs = values.get("configs", [])
    require(isinstance(configs, list), f"{where}: configs must be an array of tables ([[configs]])")
    names = set()
    for index, entry in enumerate(configs):
        trials = plan_config(spec, entry, f"{where}: configs[{index}]")
        label = trials[0].config.split("[")[0]
        require(label not in names, f"{where}: two configs are named {label!r}")
        names.add(label)
        spec.planned += trials
    if "search" in values:
        require(not configs, f"{where}: a sweep has [[configs]] or [search], not both (make two sweep files)")
        spec.search = parse_search(values["search"], f"{where}: [search]")
    require(spec.planned or spec.search, f"{where}: nothing to run: add [[configs]] or [search]")
    return spec


def plan_config(spec: SweepSpec, entry: Any, where: str) -> list[PlannedTrial]:
    """A configuration's trials: one per grid point and seed, each with its error if it has one."""
    entry = table(entry, where, CONFIG_KEYS)
    name = entry.get("name", "")
    require(isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None,
            f"{where}: name must be letters, digits and _.+-, got {name!r}")
    quant = entry.get("quant", spec.quant)
    require(isinstance(quant, str) and quant, f"{where}.quant must be a string such as \"int4\"")
    preset = entry.get("preset", "")
    require(isinstance(preset, str), f"{where}.preset must be a preset's name")
    if preset:
        read_preset(preset)  # an unknown preset is the file's error: nothing of that name could run
    settings = settings_table(entry.get("set", {}), f"{where}.set")
    grid = settings_table(entry.get("grid", {}), f"{where}.grid")
    error = ""
    for key, options in grid.items():
        if not isinstance(options, list):
            error = f"grid key {key!r} must list its values"
        elif not options:
            error = f"grid key {key!r} has no values"
    points: list[dict[str, Any]] = [{}]
    if grid and not error:
        points = [dict(zip(grid, combination)) for combination in itertools.product(*grid.values())]
    trials = []
    for point in points:
        label = name + (f"[{point_label(point)}]" if point else "")
        merged = {**settings, **point}
        for seed in spec.seeds:
            problem = error or spec.check_trial(merged, seed, preset)
            trials.append(PlannedTrial(f"{label}/seed{seed}", label, seed, merged, quant, preset, problem))
    return trials


def parse_search(values: Any, where: str) -> Search:
    values = table(values, where, SEARCH_KEYS)
    trials = values.get("trials")
    require(isinstance(trials, int) and trials > 0, f"{where}.trials must be a positive integer")
    sampler, pruner = values.get("sampler", "tpe"), values.get("pruner", "none")
    require(sampler in SAMPLERS, f"{where}.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    require(pruner in PRUNERS, f"{where}.pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    space = settings_table(values.get("space"), f"{where}.space")
    require(space, f"{where}.space must name at least one setting to search")
    for key, choice in space.items():
        if isinstance(choice, list):
            require(choice, f"{where}.space: {key!r} lists no values")
            continue
        require(isinstance(choice, dict) and set(choice) <= {"low", "high", "log", "step"}
                and {"low", "high"} <= set(choice),
                f"{where}.space: {key!r} must be a list of values or {{ low, high[, log][, step] }}")
        low, high = choice["low"], choice["high"]
        require(isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high,
                f"{where}.space: {key!r} needs numbers low < high")
        require(not choice.get("log") or low > 0, f"{where}.space: {key!r} with log = true needs low > 0")
    seed = values.get("seed")
    require(seed is None or isinstance(seed, int), f"{where}.seed must be an integer")
    return Search(trials, sampler, pruner, space, seed)


def table(value: Any, where: str, keys: set[str], required: bool = False) -> dict[str, Any]:
    require(value is not None or not required, f"{where} is missing")
    value = {} if value is None else value
    require(isinstance(value, dict), f"{where} must be a table")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(keys))})")
    return value


def settings_table(value: Any, where: str) -> dict[str, Any]:
    """Dotted config keys to values, with the keys the sweep sets itself refused."""
    require(isinstance(value, dict), f"{where} must be a table of \"section.key\" = value")
    for key in value:
        require(key not in SET_BY_THE_SWEEP,
                f"{where}: {key} is set by the sweep ([sweep].seeds, minutes or steps), not per trial")
        require("." in key, f"{where}: {key!r} must be a dotted config key in quotes, such as \"model.d_model\"")
    return value


def point_label(point: dict[str, Any]) -> str:
    """``grid_size=4,mult=2``: each key's last part, or the whole key where two last parts agree."""
    last = [key.rsplit(".", 1)[-1] for key in point]
    names = [short if last.count(short) == 1 else key for short, key in zip(last, point)]
    return ",".join(f"{name}={render(value)}" for name, value in zip(names, point.values()))


def render(value: Any) -> str:
    """A short, stable text for a grid value in a configuration's label."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def require(condition: Any, message: str) -> None:
    if not condition:
        raise UserError(message)
