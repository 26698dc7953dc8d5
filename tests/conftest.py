from pathlib import Path

import pytest
import torch

from seedbed.config import resolve_config
from seedbed.data import Dataset, load_dataset, load_documents
from seedbed.loaded import LoadedModel
from seedbed.runs import load
from seedbed.train import trainer as trainer_module
from seedbed.train.trainer import Trainer


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run pytest -m gpu on a machine with one)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def trains_on_the_cpu(request, monkeypatch):
    """Every test that trains in this process names its device: left at ``train.device=auto``, it
    would train on CUDA on a machine with a GPU, where CPU bit-exactness (resume, determinism) does
    not hold. Tests of GPU behaviour carry the ``gpu`` marker and choose freely."""
    if request.node.get_closest_marker("gpu"):
        return
    pick_device = trainer_module.pick_device

    def cpu_only(name, dist_info):
        if name != "cpu":
            pytest.fail(f"this test trains with train.device={name}: pin train.device=cpu (or mark it gpu)")
        return pick_device(name, dist_info)

    monkeypatch.setattr(trainer_module, "pick_device", cpu_only)


@pytest.fixture(scope="session")
def default_dataset() -> Dataset:
    """The Shakespeare corpus with the bytes tokenizer (downloaded once into the cache)."""
    return load_dataset("default")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Six real Shakespeare texts cut to 12 kB each: quick to train and to score."""
    folder = tmp_path_factory.mktemp("corpus")
    for doc in load_documents("default")[:6]:
        (folder / doc.name).write_bytes(doc.data[:12000])
    return folder


@pytest.fixture(scope="session")
def tiny_run(small_corpus, tmp_path_factory) -> Path:
    """A small byte-level model trained for 60 steps: fast to pack, score and code with."""
    cfg = resolve_config("gpt", overrides=[
        "model.d_model=64", "model.n_layers=2", "model.max_seq_len=64", "model.mixer.n_heads=4",
        "train.batch_size=8", "train.steps=60", "train.dtype=fp32", "train.device=cpu", f'data.spec="{small_corpus}"'])
    run = tmp_path_factory.mktemp("tiny") / "run"
    Trainer(cfg, run, progress=False).run()
    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_run) -> LoadedModel:
    return load(tiny_run)
