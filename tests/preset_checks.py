"""Checks shared by the tests that train a preset through the CLI (not a test module itself)."""

from pathlib import Path

from seedbed.loaded import LoadedModel
from seedbed.model import LM
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model
from seedbed.runs import load

HAMLET = (b"HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
          b"The slings and arrows of outrageous fortune,\n") * 12


def check_learns_and_packs_exactly(run: Path, tmp_path: Path) -> LoadedModel:
    """The trained run, after checking that its fp32 artifact scores HAMLET exactly as the run does
    and that it beats the untrained model on it by more than 1 bpb."""
    loaded = load(run)
    exact = load_artifact(pack_model(loaded, tmp_path / "fp32.seedbed", QuantRule.parse("fp32")).path)
    assert exact.evaluate(HAMLET).bpb == loaded.evaluate(HAMLET).bpb
    untrained = LoadedModel(LM(loaded.model.cfg).eval(), loaded.config, loaded.tokenizer, run)
    assert loaded.evaluate(HAMLET).bpb < untrained.evaluate(HAMLET).bpb - 1.0
    return loaded
