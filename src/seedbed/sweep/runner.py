"""``seedbed sweep``: run a sweep file's trials, N at a time, in an Optuna study that survives anything.

Each trial is two child processes: ``seedbed train --config`` (the trial's whole config, written
beside its run folder) and ``seedbed pack --report``; what it records is the packed model's val
bpb (the study's objective), the artifact's bytes, the wall-clock seconds of both, the training
tokens/s and steps, and the machine. A worker runs ``parallel`` trials side by side, each with
``cores // parallel`` threads.

The study lives in a database: by default ``study.db`` (SQLite) in the sweep folder; any
SQLAlchemy URL works (``--storage postgresql://user@host/db``), so workers on several
machines, each running ``seedbed sweep FILE --storage URL``, share one study. How the
workers agree, whatever kills them:

- Planned trials (configs x seeds) are known by a key. A worker enqueues each key that has no
  trial waiting, running or finished, then claims waiting trials one at a time; the database's
  compare-and-set on the state (WAITING -> RUNNING) gives each to one worker. If two workers
  enqueued the same key at once, the claimant of the later copy sees the earlier one and marks
  its own as a duplicate without running it.
- A running trial's worker writes a heartbeat every ``heartbeat`` seconds. A trial whose
  heartbeat is older than 3 heartbeats (its worker was killed, even with kill -9) is failed as
  stale by the next worker to look, and its key is enqueued again: a stopped sweep resumes by
  running the same command, and finished trials are never redone.
- Children die with their worker (Linux's parent-death signal), so a killed sweep leaves no
  training behind; a rerun trial starts from an empty run folder.
- ``[search]`` trials (a sweep has them or planned ones, never both) are asked of the study's sampler until ``trials`` have been started
  (stale ones not counted); an over-count from a race is marked and not run.

A trial that cannot run (a bad config) or crashes is recorded as failed with its one-line reason;
the sweep goes on, and reports them at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from seedbed.errors import UserError
from seedbed.fileio import atomic_write_text
from seedbed.sweep.spec import PlannedTrial, SweepSpec, render

STORAGE_FILE = "study.db"
PACK_REPORT = "pack.json"
# The outcomes a trial can end with (its "outcome" attribute); a stale trial has none.
RESULTS = ("complete", "pruned", "invalid", "crashed")  # the key is done: never run again
DUPLICATE = "duplicate"  # a second copy of a key, or a search trial past the count: never ran


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def storage_url(folder: Path, url: str | None) -> str:
    return url or f"sqlite:///{(folder / STORAGE_FILE).resolve()}"


RACES_TO_CREATE = ("already exists", "UNIQUE constraint failed", "duplicate key value")  # SQLite, PostgreSQL


def shareable_url(url: str | None) -> str | None:
    """The URL to remember in the sweep folder: None for the folder's own file, or for a URL
    with a password in it (the leaderboard then needs --storage again)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    try:
        return None if make_url(url).password else url
    except Exception:
        return None


def open_storage(url: str, heartbeat: int):
    """The study's database, its tables made if new. Workers that start together on a new file
    race to make them (and to stamp the schema's version); the loser opens it again."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                              grace_period=3 * heartbeat)
        except Exception as err:  # a bad URL, an unreachable server, a missing driver, or the race above
            if any(race in str(err) for race in RACES_TO_CREATE) and attempt < 4:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise UserError(f"cannot open the study storage {url}: {str(err).splitlines()[0]}") from None


def open_study(spec: SweepSpec, storage, load_only: bool = False):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner = None, optuna.pruners.NopPruner()
    if spec.search is not None:
        seed = spec.search.seed
        sampler = (optuna.samplers.RandomSampler(seed=seed) if spec.search.sampler == "random"
                   else optuna.samplers.TPESampler(seed=seed))
        if spec.search.pruner == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=3)
    if load_only:
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)
    return optuna.create_study(study_name=spec.name, storage=storage, direction="minimize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def distributions(space: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Optuna distributions for a search space; categorical values that are not scalars (tables)
    are offered by their rendered text, with the map back to the value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    result, decode = {}, {}
    for key, choice in space.items():
        if isinstance(choice, list):
            if all(isinstance(v, (bool, int, float, str)) for v in choice):
                result[key] = CategoricalDistribution(choice)
            else:
                decode[key] = {render(v): v for v in choice}
                result[key] = CategoricalDistribution(list(decode[key]))
        elif all(isinstance(choice[k], int) for k in ("low", "high")) and isinstance(choice.get("step", 1), int):
            result[key] = IntDistribution(choice["low"], choice["high"], log=bool(choice.get("log")),
                                          step=choice.get("step", 1))
        else:
            result[key] = FloatDistribution(float(choice["low"]), float(choice["high"]), log=bool(choice.get("log")),
                                            step=choice.get("step"))
    return result, decode


class Stopped(Exception):
    """The worker was interrupted while a child ran (the child is killed)."""


@dataclass
class Claimed:
    trial: Any  # optuna.Trial
    planned: PlannedTrial


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds until stopped (the first is recorded
    when the trial is claimed)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, args=(storage, trial_id, interval), daemon=True)
        self.thread.start()

    def beat(self, storage, trial_id: int, interval: int) -> None:
        while not self.stopped.wait(interval):
            storage.record_heartbeat(trial_id)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def die_with_parent() -> None:
    """In a child, before exec: receive SIGKILL when the worker that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Sweep:
    def __init__(self, spec: SweepSpec, folder: Path, url: str | None = None, parallel: int = 0,
                 heartbeat: int = 30, log=sys.stderr):
        import optuna

        self.spec, self.folder, self.log = spec, folder, log
        self.heartbeat = heartbeat
        self.parallel = parallel or usable_cores()
        self.threads = max(1, usable_cores() // self.parallel)
        self.url = storage_url(folder, url)
        self.storage = open_storage(self.url, heartbeat)
        self.study = open_study(spec, self.storage)
        self.study_id = self.storage.get_study_id_from_name(spec.name)
        self.states = optuna.trial.TrialState
        self.lock = threading.Lock()  # claiming is one at a time within this worker
        self.search_space = distributions(spec.search.space) if spec.search else ({}, {})
        self.counts = {outcome: 0 for outcome in RESULTS}
        self.planned_by_key = {p.key: p for p in spec.planned}
        self.stop = threading.Event()

    # --- which trials exist, and what they mean ----------------------------------------------------

    def trials(self):
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    def outcome(self, trial) -> str:
        """'' for a trial that is waiting, running or stale; else how it ended."""
        return trial.user_attrs.get("outcome", "") if trial.state.is_finished() else ""

    def live(self, trial) -> bool:
        return trial.state in (self.states.WAITING, self.states.RUNNING)

    def settled(self, trial) -> bool:
        """Finished with a result that stands for its key (not stale, not a duplicate)."""
        return self.outcome(trial) in RESULTS

    def fail_stale(self) -> None:
        import optuna

        optuna.storages.fail_stale_trials(self.study)

    # --- claiming ----------------------------------------------------------------------------------

    def enqueue_missing(self) -> None:
        taken = {t.user_attrs.get("key") for t in self.trials() if self.live(t) or self.settled(t)}
        for planned in self.spec.planned:
            if planned.key not in taken:
                self.study.enqueue_trial({}, user_attrs=planned.attrs())

    def claim_planned(self) -> Claimed | None:
        import optuna

        waiting = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(self.states.WAITING,))
        for trial in waiting:
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, state=self.states.RUNNING):
                    continue  # another worker claimed it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.record_heartbeat(trial._trial_id)  # at once: a trial without one never goes stale
            same_key = [t for t in self.trials() if t.user_attrs.get("key") == trial.user_attrs.get("key")]
            first_live = min((t.number for t in same_key if self.live(t)), default=trial.number)
            if any(self.settled(t) for t in same_key) or first_live != trial.number:
                self.finish_unrun(trial._trial_id, DUPLICATE, "another copy of this trial ran or is running")
                continue
            planned = self.planned_by_key.get(trial.user_attrs["key"])
            if planned is None:  # enqueued by a worker whose sweep file planned more: run it as stored
                attrs = trial.user_attrs
                planned = PlannedTrial(attrs["key"], attrs["config"], attrs["seed"], json.loads(attrs["settings"]),
                                       attrs["quant"], attrs.get("preset", ""))
                planned.error = self.spec.check_trial(planned.settings, planned.seed, planned.preset)
            return Claimed(optuna.Trial(self.study, trial._trial_id), planned)
        return None

    def claim_search(self) -> Claimed | None:
        started = [t for t in self.trials() if t.user_attrs.get("key", "").startswith("search/")
                   and (self.live(t) or self.settled(t))]
        if len(started) >= self.spec.search.trials:
            return None
        fixed, decode = self.search_space
        with warnings.catch_warnings():  # "heartbeat is meant for optimize()": ours comes from Heartbeat
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask(fixed)
        self.storage.record_heartbeat(trial._trial_id)
        earlier = sum(1 for t in started if t.number < trial.number)
        seed = self.spec.seeds[0]
        settings = {k: decode.get(k, {}).get(v, v) for k, v in trial.params.items()}
        planned = PlannedTrial(f"search/{trial.number:04d}", "search", seed, settings, self.spec.quant,
                               self.spec.check_trial(settings, seed))
        for name, value in planned.attrs().items():
            trial.set_user_attr(name, value)
        if earlier >= self.spec.search.trials:
            self.finish_unrun(trial._trial_id, DUPLICATE, "the search had started its trials already")
            return None
        return Claimed(trial, planned)

    def claim(self) -> Claimed | None:
        with self.lock:
            self.fail_stale()
            if self.spec.search:
                return self.claim_search()
            self.enqueue_missing()
            return self.claim_planned()

    def finish_unrun(self, trial_id: int, outcome: str, reason: str) -> None:
        self.storage.set_trial_user_attr(trial_id, "outcome", outcome)
        self.storage.set_trial_user_attr(trial_id, "error", reason)
        self.storage.set_trial_state_values(trial_id, state=self.states.FAIL)

    def all_settled(self) -> bool:
        trials = self.trials()
        settled_keys = {t.user_attrs.get("key") for t in trials if self.settled(t)}
        if any(p.key not in settled_keys for p in self.spec.planned):
            return False
        if self.spec.search:
            searched = [t for t in trials if t.user_attrs.get("key", "").startswith("search/") and self.settled(t)]
            return len(searched) >= self.spec.search.trials
        return True

    # --- running -----------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Run until every trial of the sweep has a result here or in another worker; the outcome counts."""
        workers = [threading.Thread(target=self.work, daemon=True) for _ in range(self.parallel)]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                while worker.is_alive():
                    worker.join(0.5)
        except KeyboardInterrupt:
            self.stop.set()
            raise
        return self.counts

    def work(self) -> None:
        while not self.stop.is_set():
            claimed = self.claim()
            if claimed is None:
                if self.all_settled():
                    return
                self.stop.wait(self.heartbeat)  # trials running elsewhere, or stale ones not yet failed
                continue
            beat = Heartbeat(self.storage, claimed.trial._trial_id, self.heartbeat)
            try:
                outcome = self.run_trial(claimed)
            except Stopped:  # interrupted: the trial stays running, goes stale, and a resume reruns it
                return
            finally:
                beat.stop()
            with self.lock:
                self.counts[outcome] += 1

    def run_trial(self, claimed: Claimed) -> str:
        trial, planned = claimed.trial, claimed.planned
        if planned.error:
            self.tell(trial, "invalid", error=planned.error)
            return "invalid"
        name = planned.key.replace("/", "-")
        run_dir, config_path = self.folder / "runs" / name, self.folder / "configs" / f"{name}.toml"
        shutil.rmtree(run_dir, ignore_errors=True)  # what a killed earlier attempt left
        run_dir.mkdir(parents=True)
        config = self.spec.trial_config(planned.settings, planned.seed, planned.preset)
        config.setdefault("train", {})["threads"] = self.threads
        atomic_write_text(config_path, tomli_w.dumps(config))
        print(f"[trial {trial.number}] {planned.key}: training", file=self.log, flush=True)
        start = time.perf_counter()
        train = [sys.executable, "-m", "seedbed", "train", "--config", str(config_path), "--out", str(run_dir),
                 "--no-progress"]
        code, pruned = self.child(train, run_dir / "train.log", trial, run_dir / "metrics.jsonl")
        if pruned:
            self.tell(trial, "pruned", wall_seconds=round(time.perf_counter() - start, 1), run=str(run_dir))
            return "pruned"
        if code == 0:
            pack = [sys.executable, "-m", "seedbed", "pack", str(run_dir), "--quant", planned.quant,
                    "--report", str(run_dir / PACK_REPORT)]
            code, _ = self.child(pack, run_dir / "pack.log")
        wall = time.perf_counter() - start
        if code != 0:
            reason = last_line(run_dir / ("pack.log" if (run_dir / "pack.log").exists() else "train.log"))
            self.tell(trial, "crashed", error=reason or f"exit code {code}", run=str(run_dir))
            return "crashed"
        report = json.loads((run_dir / PACK_REPORT).read_text())
        final = final_metrics(run_dir / "metrics.jsonl")
        self.tell(trial, "complete", value=report["val_bpb"], val_bpb_float=report["val_bpb_before"],
                  artifact_bytes=report["bytes"], wall_seconds=round(wall, 1),
                  train_seconds=final.get("train_seconds"), tokens_per_second=final.get("tokens_per_second_mean"),
                  steps=final.get("step"), params=final.get("params"), machine=report["machine"], run=str(run_dir))
        return "complete"

    def child(self, command: list[str], log_path: Path, trial=None, metrics: Path | None = None) -> tuple[int, bool]:
        """Run a child process to its end, logging to ``log_path``; with a trial, report each val bpb
        it logs as an intermediate value and stop it if the pruner says so. Returns (exit code, pruned)."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=die_with_parent if sys.platform == "linux" else None)
            reader = MetricsTail(metrics) if metrics else None
            evaluations = 0
            while True:
                try:
                    code = process.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.stop.is_set():
                    process.kill()
                    process.wait()
                    raise Stopped
                if reader is not None and trial is not None:
                    for value in reader.new_val_bpb():
                        trial.report(value, evaluations)  # the n-th evaluation: trials align in time
                        evaluations += 1
                        if trial.should_prune():
                            process.kill()
                            process.wait()
                            return process.returncode, True
        return code, False

    def tell(self, trial, outcome: str, value: float | None = None, **attrs) -> None:
        import optuna

        trial.set_user_attr("outcome", outcome)
        for name, attr in attrs.items():
            trial.set_user_attr(name, attr)
        state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}.get(
            outcome, optuna.trial.TrialState.FAIL)
        self.study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        what = f"val bpb {value:.4f}, {attrs.get('artifact_bytes', 0):,} bytes" if value is not None else \
            attrs.get("error", outcome)
        print(f"[trial {trial.number}] {trial.user_attrs.get('key', '')}: {outcome}: {what}", file=self.log, flush=True)


class MetricsTail:
    """The periodic evaluations' val bpb (``val_bpb_partial``) newly in a growing metrics.jsonl,
    whole lines only."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_val_bpb(self) -> list[float]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except OSError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        values = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record.get("val_bpb_partial"), float):
                values.append(record["val_bpb_partial"])
        return values


def final_metrics(path: Path) -> dict[str, Any]:
    """The trainer's closing record (it carries tokens_per_second_mean)."""
    for line in reversed(path.read_text().splitlines()):
        record = json.loads(line)
        if "tokens_per_second_mean" in record:
            return record
    return {}


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
