"""The `architectures` preset end to end through the CLI, on real Shakespeare text."""

import json

from preset_checks import HAMLET, check_learns_and_packs_exactly
from test_train import seedbed

from seedbed.codec import artifact_digest, compress_bytes, decompress_bytes
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import load_artifact, pack_model

SMALLER = ["model.n_layers=4", "train.batch_size=8", "train.device=cpu"]  # one Mamba-2 triple and one use of the routed block


def test_the_architectures_preset_trains_packs_compresses_and_drafts_exactly(tmp_path, small_corpus):
    """The run learns and logs its routing; the fp32 artifact scores exactly what the run scores; the
    int8 artifact compresses and decompresses byte-exactly at the bpb it evaluates to (with the causal
    routing decision, one state per row); and drafting with half the layers gives plain greedy's tokens
    (the CLI's --draft-layers is tested in test_layerskip.py)."""
    run = tmp_path / "run"
    out = seedbed("train", "--preset", "architectures", "--steps", "25", "--data", str(small_corpus), "--out", str(run),
                  "--no-progress", *SMALLER)
    assert out.returncode == 0, out.stderr
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    routed = [r for r in logged if "mod_picked_fraction" in r]
    assert routed and all(abs(r["mod_picked_fraction"] - 0.25) < 1e-9 for r in routed)  # top-k in training
    assert all(0 <= r["mod_disagreement"] <= 1 for r in routed)

    loaded = check_learns_and_packs_exactly(run, tmp_path)
    path = pack_model(loaded, tmp_path / "int8.seedbed", QuantRule.parse("int8")).path
    artifact, digest = load_artifact(path), artifact_digest(path)
    verse = HAMLET[:len(HAMLET) // 3]  # coding steps token by token: a shorter text keeps the test quick
    blob, stats = compress_bytes(artifact, digest, verse, streams=4)
    assert decompress_bytes(artifact, digest, blob)[0] == verse
    # The payload is the model's bits plus at most each stream's final coder state (64 bits).
    bits = artifact.evaluate(verse).bits
    assert -0.01 * bits < 8 * stats.payload_bytes - bits < 4 * 64

    prompt = [int(t) for t in artifact.encode(b"HAMLET.")]
    plain = list(artifact.model.generate(prompt, 80, temperature=0))
    assert list(artifact.model.generate(prompt, 80, temperature=0, draft_layers=2)) == plain
