"""seedbed sweep and seedbed leaderboard: sweep files, a sweep through the CLI, killed and resumed,
two workers on one study, and the Pareto front."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from run_cli import seedbed
from seedbed.errors import UserError
from seedbed.sweep.leaderboard import pareto_front
from seedbed.sweep.spec import parse_sweep

TINY = ('"model.d_model" = 32, "model.n_layers" = 1, "model.max_seq_len" = 32, "model.mixer.n_heads" = 2, '
        '"train.batch_size" = 4, "train.eval_tokens" = 512, "train.dtype" = "fp32", "train.device" = "cpu"')


def sweep_file(folder: Path, corpus: Path, configs: str, steps: int = 3, seeds: str = "[1]") -> Path:
    path = folder / "tiny.toml"
    path.write_text(f'[sweep]\npreset = "gpt"\nsteps = {steps}\nseeds = {seeds}\n'
                    f'set = {{ {TINY}, "data.spec" = "{corpus}" }}\n\n{configs}')
    return path


def trials_by_key(folder: Path) -> dict[str, list]:
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    keys: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        keys.setdefault(trial.user_attrs.get("key"), []).append(trial)
    return keys


def settled(trials: list) -> list:
    return [t for t in trials if t.state.is_finished() and t.user_attrs.get("outcome") in
            ("complete", "pruned", "invalid", "crashed")]


# --- the sweep file ------------------------------------------------------------------------------

def parse(text: str):
    import tomllib

    return parse_sweep(tomllib.loads(text), Path("/tmp/s.toml"))


def test_a_grid_expands_to_every_combination_and_seed_and_bad_configs_keep_their_own_errors():
    spec = parse('[sweep]\npreset = "gpt"\nminutes = 1\nseeds = [1, 2]\n'
                 '[[configs]]\nname = "g"\ngrid = { "model.ffn.mult" = [2.0, 4.0], "model.n_layers" = [1, 2] }\n'
                 '[[configs]]\nname = "bad"\nset = { "model.nonsense" = 1 }\n'
                 '[[configs]]\nname = "empty"\ngrid = { "model.d_model" = [] }\n'
                 '[[configs]]\nname = "zamba"\npreset = "zamba"\nset = { "model.n_layers" = 4 }\n')
    good = [t for t in spec.planned if t.config.startswith("g[")]
    assert len(good) == 8 and len({t.key for t in spec.planned}) == len(spec.planned)
    assert {t.config for t in good} == {"g[mult=2.0,n_layers=1]", "g[mult=2.0,n_layers=2]",
                                        "g[mult=4.0,n_layers=1]", "g[mult=4.0,n_layers=2]"}
    assert all(not t.error for t in good)
    config = spec.trial_config(good[0].settings, 2)
    assert config["train"]["seed"] == 2 and config["train"]["minutes"] == 1.0 and config["model"]["ffn"]["mult"] == 2.0
    zamba = [t for t in spec.planned if t.config == "zamba"]
    assert not zamba[0].error and spec.trial_config(zamba[0].settings, 1, zamba[0].preset)["model"]["pattern"] == \
        ["default*3", "attn"] and spec.trial_config(zamba[0].settings, 1, zamba[0].preset)["model"]["n_layers"] == 4
    bad = {t.config: t.error for t in spec.planned if t.error}
    assert "nonsense" in bad["bad"] and bad["empty"] == "grid key 'model.d_model' has no values"


@pytest.mark.parametrize("text, message", [
    ('[sweep]\nminutes = 1\n[[configs]]\nname = "a"\n', "exactly one of preset or config"),
    ('[sweep]\npreset = "gpt"\n[[configs]]\nname = "a"\n', "exactly one of minutes or steps"),
    ('[sweep]\npreset = "gpt"\nminutes = 1\n', "nothing to run"),
    ('[sweep]\npreset = "gpt"\nminutes = 1\ncolour = 3\n[[configs]]\nname = "a"\n', "unknown key 'colour'"),
    ('[sweep]\npreset = "gpt"\nminutes = 1\n[[configs]]\nname = "a"\nset = { "train.seed" = 3 }\n', "set by the sweep"),
    ('[sweep]\npreset = "gpt"\nminutes = 1\n[[configs]]\nname = "a"\n[[configs]]\nname = "a"\n', "two configs"),
    ('[sweep]\npreset = "gpt"\nminutes = 1\n[search]\ntrials = 2\nspace = { "train.lr" = { low = 1, high = 0 } }\n',
     "low < high"),
    ('[sweep]\npreset = "nope"\nminutes = 1\n[[configs]]\nname = "a"\n', "unknown preset"),
])
def test_a_sweep_file_that_cannot_run_at_all_is_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse(text)


def test_the_pareto_front_of_hand_made_points():
    points = [(1, 5.0), (2, 4.0), (2, 4.5), (3, 4.0), (4, 2.0), (5, 2.0), (0.5, 9.0), (4, 2.0)]
    # (2, 4.5) is beaten by (2, 4.0); (3, 4.0) by (2, 4.0); (5, 2.0) by (4, 2.0); the two (4, 2.0) tie.
    assert pareto_front(points) == [6, 0, 1, 4, 7]
    assert pareto_front([]) == [] and pareto_front([(1, 1)]) == [0]


# --- through the CLI -----------------------------------------------------------------------------

def test_a_tiny_sweep_runs_end_to_end_reports_bad_trials_and_draws_its_leaderboard(tmp_path, small_corpus):
    path = sweep_file(tmp_path, small_corpus, '[[configs]]\nname = "mlp2"\nset = { "model.ffn.mult" = 2.0 }\n'
                      '[[configs]]\nname = "mlp4"\nset = { "model.ffn.mult" = 4.0 }\n'
                      '[[configs]]\nname = "bad"\nset = { "model.nonsense" = 1 }\n'
                      '[[configs]]\nname = "crash"\nset = { "data.spec" = "/no/such/corpus" }\n')
    out = tmp_path / "sweep"
    result = seedbed("sweep", str(path), "--out", str(out), "--parallel", "2", "--heartbeat", "1")
    assert result.returncode == 1, result.stderr  # a trial failed; the others ran
    keys = trials_by_key(out)
    outcome = {key: [t.user_attrs["outcome"] for t in trials] for key, trials in keys.items()}
    assert outcome == {"mlp2/seed1": ["complete"], "mlp4/seed1": ["complete"], "bad/seed1": ["invalid"],
                       "crash/seed1": ["crashed"]}
    for key in ("mlp2/seed1", "mlp4/seed1"):
        trial = keys[key][0]
        report = json.loads((Path(trial.user_attrs["run"]) / "pack.json").read_text())
        assert trial.value == report["val_bpb"] and trial.user_attrs["artifact_bytes"] == report["bytes"]
        assert trial.user_attrs["artifact_bytes"] == (Path(trial.user_attrs["run"]) / "model.seedbed").stat().st_size
        assert trial.user_attrs["steps"] == 3 and trial.user_attrs["wall_seconds"] > 0
        assert trial.user_attrs["tokens_per_second"] > 0 and " thread" in trial.user_attrs["machine"]
    # the wider MLP has more weights, so a bigger artifact at the same int8 storage
    assert keys["mlp4/seed1"][0].user_attrs["artifact_bytes"] > keys["mlp2/seed1"][0].user_attrs["artifact_bytes"]
    assert "nonsense" in keys["bad/seed1"][0].user_attrs["error"]

    board = seedbed("leaderboard", str(out), "--markdown", str(tmp_path / "board.md"))
    assert board.returncode == 0, board.stderr
    ranked = [line for line in board.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    values = sorted((keys[k][0].value, k) for k in ("mlp2/seed1", "mlp4/seed1"))
    assert [values[0][1] in ranked[0], values[1][1] in ranked[1]] == [True, True]
    assert "- bad/seed1: invalid:" in board.stdout and "- crash/seed1: crashed:" in board.stdout
    written = (tmp_path / "board.md").read_text()
    assert ranked[0] in written and "](sweep/pareto-bytes.png)" in written and "](sweep/pareto-time.png)" in written
    for name in ("pareto-bytes.png", "pareto-time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = seedbed("sweep", str(path), "--out", str(out), "--parallel", "2", "--heartbeat", "1")
    assert "none (all were done)" in again.stdout and again.returncode == 0
    assert {key: len(trials) for key, trials in trials_by_key(out).items()} == {key: 1 for key in keys}


def start_sweep(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seedbed", "sweep", str(path), "--out", str(out), "--heartbeat",
                             "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_a_sweep_killed_mid_way_resumes_without_redoing_a_finished_trial(tmp_path, small_corpus):
    configs = "".join(f'[[configs]]\nname = "m{m}"\nset = {{ "model.ffn.mult" = {m}.0 }}\n' for m in (1, 2, 3))
    path = sweep_file(tmp_path, small_corpus, configs, steps=40)
    out = tmp_path / "sweep"
    worker = start_sweep(path, out, "--parallel", "1")

    def one_done_and_next_started() -> bool:
        if not (out / "sweep.json").exists():  # written once the study's tables are made
            return False
        trials = [t for ts in trials_by_key(out).values() for t in ts]
        return any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" for t in trials)

    wait_until(one_done_and_next_started)
    killed_child = [t for ts in trials_by_key(out).values() for t in ts if t.state.name == "RUNNING"][0]
    finished = {key: ts[0] for key, ts in trials_by_key(out).items() if ts[0].state.name == "COMPLETE"}
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(1)
    orphans = subprocess.run(["pgrep", "-f", str(out / "runs")], capture_output=True, text=True).stdout
    assert not orphans.strip(), "a trial's training outlived its killed worker"

    resumed = start_sweep(path, out, "--parallel", "1")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    keys = trials_by_key(out)
    assert set(keys) == {"m1/seed1", "m2/seed1", "m3/seed1"}
    for key, trials in keys.items():
        assert len(settled(trials)) == 1 and settled(trials)[0].user_attrs["outcome"] == "complete"
    for key, trial in finished.items():  # not run again: the same trial, and no second training
        assert [t.number for t in keys[key]] == [trial.number]
        assert f"{key}: training" not in stderr
    stale = [t for t in keys[killed_child.user_attrs["key"]] if t.number == killed_child.number][0]
    assert stale.state.name == "FAIL" and "outcome" not in stale.user_attrs  # failed by its silent heartbeat
    assert f"{killed_child.user_attrs['key']}: training" in stderr  # and its key ran again


def test_two_workers_on_one_storage_file_never_run_the_same_trial_twice(tmp_path, small_corpus):
    configs = "".join(f'[[configs]]\nname = "m{m}"\nset = {{ "model.ffn.mult" = {m}.0 }}\n' for m in (1, 2))
    path = sweep_file(tmp_path, small_corpus, configs, seeds="[1, 2]")
    out = tmp_path / "sweep"
    workers = [start_sweep(path, out, "--parallel", "1") for _ in range(2)]
    logs = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in logs]
    started = [line.split("]", 1)[1].split(":")[0].strip() for _, err in logs for line in err.splitlines()
               if line.endswith(": training")]
    keys = trials_by_key(out)
    assert sorted(started) == sorted(keys) and len(keys) == 4  # each key trained once, by one of the two
    assert all(len(settled(trials)) == 1 for trials in keys.values())


def test_a_search_asks_optuna_for_its_trials_reports_each_evaluation_and_resumes_at_its_count(tmp_path, small_corpus):
    path = sweep_file(tmp_path, small_corpus, '[search]\ntrials = 3\nsampler = "random"\nseed = 4\npruner = "median"\n'
                      'space = { "model.ffn.mult" = [1.0, 2.0], "train.matrix_lr" = { low = 0.005, high = 0.05, '
                      'log = true }, "model.mixer" = [{ kind = "attention", n_heads = 2 }, { kind = "retention", '
                      'n_heads = 2 }] }\n', steps=12)
    path.write_text(path.read_text().replace('"train.device" = "cpu"', '"train.device" = "cpu", "train.eval_every_steps" = 4'))
    out = tmp_path / "sweep"
    result = seedbed("sweep", str(path), "--out", str(out), "--parallel", "2", "--heartbeat", "1")
    assert result.returncode == 0, result.stderr
    keys = trials_by_key(out)
    assert sorted(keys) == ["search/0000", "search/0001", "search/0002"]
    for (trial,) in keys.values():
        assert trial.user_attrs["outcome"] in ("complete", "pruned")
        assert 0.005 <= trial.params["train.matrix_lr"] <= 0.05 and trial.params["model.ffn.mult"] in (1.0, 2.0)
        config = (out / "configs" / f"{trial.user_attrs['key'].replace('/', '-')}.toml").read_text()
        assert f"matrix_lr = {trial.params['train.matrix_lr']}" in config
        assert f'kind = "{trial.params["model.mixer"].split("kind=")[1].split(",")[0]}"' in config
        assert len(trial.intermediate_values) >= 1  # the periodic evaluations, reported as they came
    again = seedbed("sweep", str(path), "--out", str(out), "--heartbeat", "1")
    assert again.returncode == 0 and "none (all were done)" in again.stdout
    assert sorted(trials_by_key(out)) == sorted(keys)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks Optuna directly; Sweep beats its own
def test_a_trial_worse_than_the_median_at_an_evaluation_is_stopped_there(tmp_path):
    """The pruning path: a child that logs a hopeless val bpb is killed at that evaluation, not run out."""
    import optuna
    from optuna.distributions import FloatDistribution

    from seedbed.sweep.runner import Stopped, Sweep

    spec = parse('[sweep]\npreset = "gpt"\nsteps = 1\n[search]\ntrials = 9\npruner = "median"\n'
                 'space = { "train.lr" = { low = 0.001, high = 0.01 } }\n')
    sweep = Sweep(spec, tmp_path, heartbeat=1)
    for value in (2.0, 2.1, 2.2):  # three finished trials, each 3.0 bpb at its first evaluation
        sweep.study.add_trial(optuna.trial.create_trial(
            value=value, params={"train.lr": 0.005}, distributions={"train.lr": FloatDistribution(0.001, 0.01)},
            intermediate_values={0: 3.0}))
    metrics = tmp_path / "metrics.jsonl"
    def child(bpb: float) -> list[str]:
        record = json.dumps({"step": 10, "val_bpb_partial": bpb})
        return [sys.executable, "-c", f"import time; open({str(metrics)!r}, 'a').write({record!r} + '\\n'); time.sleep(60)"]

    def run(bpb: float):
        """The trial, and True if pruned, None if still running when the worker stopped it 5 s in."""
        trial = sweep.study.ask({"train.lr": FloatDistribution(0.001, 0.01)})
        metrics.unlink(missing_ok=True)
        timer = threading.Timer(5.0, sweep.stop.set)
        timer.start()
        try:
            code, pruned = sweep.child(child(bpb), tmp_path / "log", trial, metrics)
            assert code != 0  # killed
        except Stopped:
            pruned = None
        finally:
            timer.cancel()
            sweep.stop.clear()
        return sweep.storage.get_trial(trial._trial_id), pruned

    better, outcome = run(2.5)  # better than the median (3.0) at evaluation 0: reported, left running
    assert outcome is None and better.intermediate_values == {0: 2.5}
    worse, outcome = run(7.0)
    assert outcome is True and worse.intermediate_values == {0: 7.0}


def test_sweep_and_leaderboard_refuse_bad_input_in_one_line(tmp_path):
    missing = seedbed("sweep", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    (tmp_path / "bad.toml").write_text("[sweep]\npreset = 'gpt'\nminutes = 1\n")
    empty = seedbed("sweep", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "s"))
    assert empty.returncode == 2 and "nothing to run" in empty.stderr and not (tmp_path / "s").exists()
    storage = seedbed("sweep", str(sweep_file(tmp_path, tmp_path, '[[configs]]\nname = "a"\n')), "--out",
                      str(tmp_path / "s"), "--storage", "nosuchdb://x")
    assert storage.returncode == 2 and "cannot open the study storage" in storage.stderr and not (tmp_path / "s").exists()
    board = seedbed("leaderboard", str(tmp_path))
    assert board.returncode == 2 and "not a sweep folder" in board.stderr
    report = seedbed("pack", str(tmp_path), "--eval-tokens", "-1", "--report", str(tmp_path / "r.json"))
    assert report.returncode == 2 and "needs --eval-tokens >= 0" in report.stderr and not (tmp_path / "r.json").exists()
