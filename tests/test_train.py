"""Training end to end: resume exactness, survival of SIGKILL, DDP, divergence, the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seedbed.bench.memory import run_measured
from seedbed.config import resolve_config
from seedbed.data import load_documents
from seedbed.errors import UserError
from seedbed.train.checkpoint import load_checkpoint
from seedbed.train.trainer import Trainer, TrainingDiverged

from run_cli import seedbed

TORCHRUN_BESIDE_PYTHON = Path(sys.executable).parent / "torchrun"
TORCHRUN = shutil.which("torchrun") or (str(TORCHRUN_BESIDE_PYTHON) if TORCHRUN_BESIDE_PYTHON.exists() else None)
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")

TINY = ["model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=4", "train.eval_tokens=2000", "train.log_every=2", "train.warmup_steps=2",
        "train.dtype=fp32", "train.threads=1", "train.device=cpu"]


def tiny_config(corpus: Path, *extra: str):
    return resolve_config("gpt", overrides=TINY + [f'data.spec="{corpus}"', *extra])




def interrupt_at_step(trainer: Trainer, step: int) -> None:
    """Run ``trainer`` until it is about to take ``step`` (1-based), then stop it as Ctrl-C would."""
    real_step = trainer.train_step

    def crash():
        if trainer.step == step - 1:
            raise KeyboardInterrupt
        return real_step()

    trainer.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run_dir / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_resume_continues_exactly(small_corpus, tmp_path, monkeypatch):
    cfg = lambda: tiny_config(small_corpus, "train.steps=12", "train.checkpoint_every_steps=5")
    straight = Trainer(cfg(), tmp_path / "straight", progress=False).run()

    interrupt_at_step(Trainer(cfg(), tmp_path / "split", progress=False), 8)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.safetensors")[1]["step"] == 5
    resumed = Trainer(cfg(), tmp_path / "split", resume=True, progress=False).run()
    assert resumed.steps == straight.steps == 12
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.val_bpb == straight.val_bpb


def test_sigkill_mid_run_loses_only_steps_since_checkpoint(small_corpus, tmp_path):
    run = tmp_path / "killed"
    args = ["train", "--out", str(run), "--steps", "400", "--data", str(small_corpus), "--no-progress",
            "train.checkpoint_every_steps=10", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "seedbed", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    checkpoint = run / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:
        if checkpoint.exists() and load_checkpoint(checkpoint)[1]["step"] >= 30:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = load_checkpoint(checkpoint)[1]["step"]
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 30 <= saved_step < 400 and max(logged) - saved_step < 10 + 2  # at most the steps since the checkpoint

    shutil.copytree(run, tmp_path / "reference")  # resume the same checkpoint twice: deterministic
    out = seedbed("train", "--resume", str(run), "--no-progress")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "the resumed log repeats or skips steps"
    assert steps[-1] == 400 and records[-1]["val_bpb"] < 8
    again = seedbed("train", "--resume", str(tmp_path / "reference"), "--no-progress")
    assert again.returncode == 0, again.stderr
    a, b = final_weights(run), final_weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small_corpus, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(small_corpus, "train.steps=20", "train.checkpoint_every_steps=5"),
                      tmp_path / "run", progress=False)
    real_forward = trainer.forward_model

    def poisoned(tokens):
        logits = real_forward(tokens)
        return logits * float("nan") if trainer.step >= 7 else logits

    trainer.forward_model = poisoned
    with pytest.raises(TrainingDiverged, match="loss became nan at step 8"):
        trainer.run()
    tensors, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 5
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))


def test_resume_without_checkpoint_is_an_error(small_corpus, tmp_path):
    with pytest.raises(UserError, match="has no checkpoint.safetensors"):
        Trainer(tiny_config(small_corpus, "train.steps=2"), tmp_path / "empty", resume=True)


# Two depths of their own, and one attention + MLP block shared by two more, with a LoRA per use:
# a parameter used twice in one forward, and adapters each use trains alone.
SHARED_STACK = ["model.n_layers=4", 'model.pattern=["default", "attn"]',
                'model.blocks={attn={mixer={kind="attention", n_heads=2}, ffn={kind="mlp"}, share="block", '
                'lora_rank=2, input="hidden+embedding"}}']


# Python processes started with fake_gpus_env(...) see CUDA devices that do not exist: enough for the
# trainer's choice of device, which touches none before it has checked the count.
FAKE_GPUS = """
import torch
torch.cuda.is_available = lambda: {count} > 0
torch.cuda.device_count = lambda: {count}
"""


def fake_gpus_env(folder: Path, count: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAKE_GPUS.format(count=count))
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def train_under_torchrun(run: Path, corpus: Path, steps: int, *overrides: str,
                         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``seedbed train`` of the TINY model on two gloo ranks; fails the test unless it succeeds."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "seedbed", "train",
                          "--out", str(run), "--steps", str(steps), "--data", str(corpus), "--no-progress", *TINY,
                          *overrides],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@needs_torchrun
def test_ddp_two_processes_stay_in_sync(small_corpus, tmp_path):
    """On a machine with one GPU (faked), two ranks train together on the CPU with gloo, as
    train.device=cpu asks (test_devices.py: without it they refuse)."""
    run = tmp_path / "ddp"
    out = train_under_torchrun(run, small_corpus, 6, *SHARED_STACK, env=fake_gpus_env(tmp_path / "site", 1))
    assert "device cpu" in out.stderr
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["world"] == 2 and final["ranks_in_sync"] is True
    # Two ranks see twice the tokens of one process with the same per-rank batch.
    assert final["step"] == 6 and out.stdout.count("val bpb") == 1
    assert "tokens 1,536" in out.stdout  # 6 steps x 2 ranks x 4 sequences x 32 tokens


def test_cli_train_eval_generate_on_default_corpus(tmp_path):
    run = tmp_path / "e2e"
    out = seedbed("train", "--preset", "gpt", "--steps", "6", "--out", str(run), "--no-progress",
                  "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", "model.mixer.n_heads=4", "train.batch_size=8",
                  "train.eval_stride=64", "train.device=cpu")
    assert out.returncode == 0, out.stderr
    assert "val bpb" in out.stdout and "42 docs" in out.stderr
    for name in ("config.toml", "metrics.jsonl", "curve.png", "checkpoint.safetensors"):
        assert (run / name).is_file(), name
    val_bpb = float(out.stdout.split("val bpb ")[1].split()[0])
    assert 2.0 < val_bpb < 8.5  # six steps: better than uniform bytes, far from trained

    scored = seedbed("eval", str(run), "--stride", "64")
    assert scored.returncode == 0, scored.stderr
    assert f"bpb {val_bpb:.4f}" in scored.stdout  # the same number as the trainer's final eval
    test_split = seedbed("eval", str(run), "--split", "test", "--stride", "64")
    assert test_split.returncode == 0 and "[test]" in test_split.stdout

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    on_file = seedbed("eval", str(run), "--text", str(text))
    assert on_file.returncode == 0 and f"bytes {text.stat().st_size:,}" in on_file.stdout

    sample = seedbed("generate", str(run), "--prompt", "ROMEO.", "--tokens", "40", "--seed", "3")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO.") and len(sample.stdout) > len("ROMEO.") + 10
    again = seedbed("generate", str(run), "--prompt", "ROMEO.", "--tokens", "40", "--seed", "3")
    assert again.stdout == sample.stdout


@pytest.mark.parametrize("preset", ["golf-gpt", "golf-seeded", "golf"])
def test_golf_presets_train_with_sentencepiece(preset, tmp_path, small_corpus):
    """The golf shape (GQA 8/4, LeakyReLU(0.5)^2, SentencePiece 1024) trains and samples, shrunk in depth
    (on 72 kB of Shakespeare: the full val split at width 512 would take most of the test's time)."""
    run = tmp_path / "golf"
    out = seedbed("train", "--preset", preset, "--steps", "2", "--data", str(small_corpus), "--out", str(run),
                  "--no-progress",
                  "model.n_layers=1", "model.max_seq_len=128", "train.batch_size=2", "train.eval_stride=128",
                  "cache.fit_tokens=1000", "train.device=cpu")
    assert out.returncode == 0, out.stderr
    assert "sp (vocab 1024)" in out.stderr and (run / "tokenizer.model").is_file()
    assert (run / "cache.bin").is_file() == (preset == "golf")
    if preset == "golf":  # the cache of SentencePiece tokens, packed under the parameter-golf budget
        with_cache = float(out.stdout.split("with the n-gram cache ")[1].split(")")[0])
        assert with_cache < float(out.stdout.split("val bpb ")[1].split()[0]) - 0.5
        packed = seedbed("pack", str(run), "-o", str(tmp_path / "golf.seedbed"), "--budget", "16000000",
                         "--eval-tokens", "-1")
        assert packed.returncode == 0, packed.stderr
        assert "n-gram cache" in seedbed("info", str(tmp_path / "golf.seedbed")).stdout
    val_bpb = float(out.stdout.split("val bpb ")[1].split()[0])
    assert 3.0 < val_bpb < 4.5  # near uniform after 2 steps: 10 bits per token / ~2.3 bytes per token
    sample = seedbed("generate", str(run), "--prompt", "KING.", "--tokens", "10", "--seed", "1")
    assert sample.returncode == 0 and sample.stdout.startswith("KING.")


def test_cli_export_shards_then_train_on_them(small_corpus, tmp_path):
    shards = tmp_path / "shards"
    out = seedbed("export-shards", "--data", str(small_corpus), "--tokenizer", "sp", "--vocab-size", "512",
                  "-o", str(shards))
    assert out.returncode == 0, out.stderr
    assert (shards / "train_000000.bin").is_file() and (shards / "tokenizer.model").is_file()
    run = tmp_path / "run"
    trained = seedbed("train", "--data", f"shards:{shards}", "--steps", "2", "--out", str(run), "--no-progress",
                      *TINY)
    assert trained.returncode == 0, trained.stderr
    assert "sp (vocab 512)" in trained.stderr
    # Scored on the shards or on the text they came from, the bpb is the same: bytes come from the text.
    on_shards = seedbed("eval", str(run), "--data", f"shards:{shards}")
    on_text = seedbed("eval", str(run), "--data", str(small_corpus))
    assert on_shards.returncode == 0 and on_text.returncode == 0, on_shards.stderr + on_text.stderr
    bpb = lambda text: text.split("bpb ")[1].split()[0]
    assert bpb(on_shards.stdout) == bpb(on_text.stdout)


def test_cli_lists_presets():
    out = seedbed("presets")
    assert out.returncode == 0 and "gpt " in out.stdout and "golf-gpt" in out.stdout


def test_mixkabrn_preset_trains_packs_evaluates_and_generates_in_1_gib_each_and_packs_under_a_megabyte(tmp_path):
    """The full-size preset (retention, MoE of KAN experts, ternary linears) at its own micro-batch:
    every phase in a process of its own stays under 1 GiB peak RSS, and the artifact under 1 MB."""
    run, artifact, corpus = tmp_path / "mix", tmp_path / "mix.seedbed", tmp_path / "corpus"
    corpus.mkdir()
    for doc in load_documents("default")[:6]:  # 3 kB each: the preset scores slowly (the run and pack both do)
        (corpus / doc.name).write_bytes(doc.data[:3000])
    # Six steps of 2 x 16 sequences (the allocator's high-water mark has settled by the third), with a
    # periodic evaluation and a checkpoint on top of it, as any run longer than a minute has them.
    phases = {"train": ["train", "--preset", "mixkabrn", "--steps", "6", "--data", str(corpus), "--out", str(run),
                        "--no-progress", "train.device=cpu", "train.eval_every_steps=4",
                        "train.checkpoint_every_steps=4"],
              "pack": ["pack", str(run), "-o", str(artifact), "--budget", "1000000"],
              "eval": ["eval", str(artifact), "--data", str(corpus)],
              "generate": ["generate", str(artifact), "--prompt", "KING.", "--tokens", "200", "--seed", "1"]}
    peaks = {}
    for phase, args in phases.items():
        measured = run_measured(args, timeout=600)
        assert measured.returncode == 0, measured.stderr
        peaks[phase] = measured.peak_mib
    assert all(peak < 1024 for peak in peaks.values()), peaks  # MiB
    assert artifact.stat().st_size <= 1_000_000
    info = seedbed("info", str(artifact))
    assert info.returncode == 0 and "ternary" in info.stdout, info.stderr
    assert measured.stdout.startswith("KING.")


def test_germinator_10b_preset_is_ten_billion_virtual_parameters_in_under_a_megabyte(tmp_path):
    from seedbed.data import ByteTokenizer
    from seedbed.model import LM, count_parameters, virtual_parameters
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import load_artifact, pack_model
    from seedbed.loaded import LoadedModel

    cfg = resolve_config("germinator-10b")
    model = LM(cfg.model)  # nothing is generated until a block runs
    assert virtual_parameters(model) >= 10_000_000_000 and count_parameters(model) < 1_000_000
    packed = pack_model(LoadedModel(model, cfg, ByteTokenizer(), tmp_path), tmp_path / "10b.seedbed",
                        QuantRule.parse("int8"), budget=1_000_000)
    again = load_artifact(packed.path).model
    assert virtual_parameters(again) == virtual_parameters(model)
    seeds, reloaded = dict(model.named_buffers()), dict(again.named_buffers())
    assert seeds.keys() == reloaded.keys() and all(torch.equal(reloaded[name], seeds[name]) for name in seeds)


def test_measured_peak_is_the_commands_own_not_its_parents():
    """Linux starts a forked child's ru_maxrss at its parent's size; the trampoline keeps a large test
    worker's memory out of the measurement."""
    parent = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB, touched
    measured = run_measured(["presets"])
    assert measured.returncode == 0 and "mixkabrn" in measured.stdout
    assert 0 < measured.peak_mib < 1024 < parent.nbytes / 2**20


def test_fine_tuning_an_artifact_trains_lora_adapters_only_and_lowers_bpb_on_the_new_text(tmp_path, small_corpus):
    """``seedbed train --from ARTIFACT``: the base's weights stay bit-identical (in the run and, for the
    ternary ones, in the packed result), the adapters are packed beside them, and the new text scores better."""
    from seedbed.pack.pack import declared_storage_kinds, load_artifact
    from seedbed.runs import load

    base_run, base, tuned_run, tuned = (tmp_path / name for name in ("base", "base.seedbed", "tuned", "tuned.seedbed"))
    trained = seedbed("train", "--preset", "gpt", "--steps", "40", "--data", str(small_corpus), "--out", str(base_run),
                      "--no-progress", "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64",
                      "model.mixer.n_heads=4", 'model.linear={kind="bitlinear"}', "train.batch_size=8",
                      "train.dtype=fp32", "train.device=cpu")
    assert trained.returncode == 0, trained.stderr
    assert seedbed("pack", str(base_run), "-o", str(base)).returncode == 0
    new_text = tmp_path / "new"  # text unlike Shakespeare: a program's source, six files
    new_text.mkdir()
    sources = sorted(Path(json.__file__).parent.glob("*.py"))[:6]
    for source in sources:
        (new_text / source.name).write_bytes(source.read_bytes()[:6000])
    bpb = lambda out: float(out.stdout.split("bpb ")[1].split()[0])
    before = seedbed("eval", str(base), "--data", str(new_text))
    assert before.returncode == 0, before.stderr

    tuned_out = seedbed("train", "--from", str(base), "--data", str(new_text), "--steps", "40", "--out", str(tuned_run),
                        "--no-progress", "train.device=cpu")
    assert tuned_out.returncode == 0, tuned_out.stderr
    assert seedbed("pack", str(tuned_run), "-o", str(tuned)).returncode == 0
    after = seedbed("eval", str(tuned), "--data", str(new_text))
    assert after.returncode == 0, after.stderr
    assert bpb(after) < bpb(before) - 0.2, (before.stdout, after.stdout)

    base_state = load_artifact(base).model.state_dict()
    run_state, packed_state = load(tuned_run).model.state_dict(), load_artifact(tuned).model.state_dict()
    adapters = {name for name in run_state if name.endswith(("lora_down", "lora_up"))}
    assert adapters and set(run_state) - adapters == set(base_state)
    assert all(torch.equal(run_state[name], base_state[name]) for name in base_state)
    ternary = [name for name, kind in declared_storage_kinds(load_artifact(base).model).items() if kind == "ternary"]
    assert ternary and all(torch.equal(packed_state[name], base_state[name]) for name in ternary)
    assert all(run_state[name].abs().sum() > 0 for name in adapters if name.endswith("lora_up"))


def test_fine_tuning_refuses_a_model_without_ternary_linears(tiny_run, tmp_path, small_corpus):
    artifact = tmp_path / "dense.seedbed"
    assert seedbed("pack", str(tiny_run), "-o", str(artifact)).returncode == 0
    out = seedbed("train", "--from", str(artifact), "--data", str(small_corpus), "--steps", "1",
                  "--out", str(tmp_path / "no"), "train.device=cpu")
    assert out.returncode == 2 and "not bitlinear" in out.stderr and not (tmp_path / "no").exists()
    missing = seedbed("train", "--from", str(artifact), "--steps", "1", "train.device=cpu")
    assert missing.returncode == 2 and "--data" in missing.stderr


def test_preset_table_reports_each_budgets_gap_to_gpt():
    from seedbed.bench.models import ModelRow, preset_lines

    def row(label, bpb, steps):
        return ModelRow(label, bpb + 0.01, bpb, 900_000, 1, 1, 5000.0, steps, steps * 4096, 700.0)
    lines = preset_lines([(4.0, row("gpt 4 min", 2.05, 900), row("mixkabrn 4 min", 2.30, 400)),
                          (10.0, row("gpt 10 min", 1.97, 2300), row("mixkabrn 10 min", 2.10, 1000))])
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(cells[0], cells[1]) for cells in body] == [("4", "gpt"), ("4", "mixkabrn"), ("10", "gpt"),
                                                          ("10", "mixkabrn")]
    assert [cells[-1] for cells in body] == ["", "+0.2500", "", "+0.1300"]
    assert body[1][4] == "2.3000" and body[3][2] == "1,000"
