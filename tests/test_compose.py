"""Composition of experts: clustering, the c-BTM router and mixture, composed artifacts, ``seedbed compose``."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seedbed.cli import main
from seedbed.compose.cbtm import CBTM, Router, prior_occurrences, reference_log_weights
from seedbed.compose.calm import CALM, reference_bridge
from seedbed.compose.phatgoose import PhatGoose, reference_routed, train_module
from seedbed.compose.cluster import balanced_assignment, balanced_kmeans, count_matrix, embed, feature_count, smooth_idf
from seedbed.data import load_splits
from seedbed.data.clusters import chunk_documents
from seedbed.data.corpus import Document
from seedbed.errors import UserError
from seedbed.eval import check_normalised
from seedbed.loaded import LoadedModel
from seedbed.pack.artifact import QuantRule
from seedbed.pack.pack import describe, load_artifact, pack_model
from seedbed.runs import load
from test_model import small_model

VOCAB = 61  # small_model's


def random_router(clusters: int, top_k: int, seed: int = 0, temperature: float = 0.1) -> Router:
    g = torch.Generator().manual_seed(seed)
    idf = 1 + torch.rand(feature_count(VOCAB), generator=g, dtype=torch.float64) * 3
    centres = torch.rand(clusters, feature_count(VOCAB), generator=g, dtype=torch.float64) * 0.05
    return Router(idf, centres, VOCAB, top_k, temperature)


def test_prior_occurrences_counts_earlier_equal_entries():
    features = torch.randint(0, 5, (3, 40), generator=torch.Generator().manual_seed(0))
    expected = [[int((row[:s] == row[s]).sum()) for s in range(len(row))] for row in features]
    assert prior_occurrences(features).tolist() == expected


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_router_equals_reference_and_steps_equal_parallel(top_k):
    router = random_router(4, top_k)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    parallel, _ = router.advance(tokens, router.init_state(2))
    for row in range(2):
        reference = reference_log_weights(tokens[row].tolist(), router.idf.numpy(), router.centres.numpy(), VOCAB,
                                          top_k, router.temperature)
        np.testing.assert_allclose(parallel[row].numpy(), reference, rtol=1e-9, atol=1e-9)
    state, pieces = router.init_state(2), []
    for lo, hi in [(0, 7), (7, 8), (8, 30)]:
        piece, state = router.advance(tokens[:, lo:hi], state)
        pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, rtol=1e-12, atol=1e-12)
    assert ((parallel > float("-inf")).sum(-1) == top_k).all()


def check_causal(model, seed: int) -> None:
    """Changing token t changes no output before t, and does change the output at t."""
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        base = model.log_probs(tokens)
        check_normalised(base)
        for t in (0, 17, 39):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 7) % VOCAB
            out = model.log_probs(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"position {t} leaked into the past"
            assert not torch.allclose(out[:, t], base[:, t])


def check_step_equals_parallel(model, seed: int) -> None:
    """A prefill of 13 tokens and then single steps give the parallel outputs (the state is
    reassigned each step: a composed model's state may be a new value, as CALM's is)."""
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(seed))
    with torch.set_grad_enabled(model.training):
        full = model(tokens)
        state = model.init_state(3, 48)
        head, state = model.step(tokens[:, :13], state)
        tail = []
        for t in range(13, 40):
            logits, state = model.step(tokens[:, t:t + 1], state)
            tail.append(logits)
        torch.testing.assert_close(torch.cat([head] + tail, 1), full, rtol=1e-4, atol=1e-4)


def small_cbtm(clusters: int = 3, top_k: int = 2) -> CBTM:
    return CBTM([small_model(seed=k) for k in range(clusters)], random_router(clusters, top_k)).eval()


def test_cbtm_is_normalised_and_causal():
    check_causal(small_cbtm(), seed=2)


def test_cbtm_mixes_experts_by_router_weights():
    """The mixture is exactly sum_k w_k p_k with the router's weights, and differs from every expert."""
    model = small_cbtm(3, 2)
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        weights = model.router.advance(tokens, model.router.init_state(1))[0].exp()
        expected = sum(weights[..., k, None] * member.log_probs(tokens).double().exp()
                       for k, member in enumerate(model.members))
        torch.testing.assert_close(model.log_probs(tokens).double().exp(), expected, rtol=1e-5, atol=1e-7)


def test_one_cluster_cbtm_equals_its_expert():
    model = small_cbtm(1, 1)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(tokens), model.members[0].log_probs(tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_cbtm_step_by_step_equals_parallel(training):
    check_step_equals_parallel(small_cbtm().train(training), seed=5)


# -- clustering -------------------------------------------------------------------------------

PROSE = b"Now is the winter of our discontent made glorious summer by this sun of York.\n"
CODE = b"def parse(value):\n    return {key: int(item) for key, item in value.items()}\n"


def two_domain_chunks() -> list[Document]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(12):
        text = PROSE if i % 2 == 0 else CODE
        words = text.split(b" ")
        docs.append(Document(f"doc{i}", b" ".join(words[j] for j in rng.integers(0, len(words), 300)) + b"\n"))
    return docs


def test_balanced_kmeans_separates_domains_deterministically_and_balanced():
    docs = two_domain_chunks()
    counts = count_matrix([np.frombuffer(d.data, np.uint8).astype(np.int64) for d in docs], 256)
    embedded = embed(counts, smooth_idf(counts))
    centres, assignment = balanced_kmeans(embedded, 2, seed=0)
    again_centres, again = balanced_kmeans(embedded, 2, seed=0)
    assert np.array_equal(assignment, again) and np.array_equal(centres, again_centres)
    assert len(set(assignment[0::2])) == 1 and len(set(assignment[1::2])) == 1 and assignment[0] != assignment[1]
    np.testing.assert_allclose(np.linalg.norm(embedded.toarray(), axis=1), 1)


def test_balanced_assignment_respects_capacity():
    distances = np.zeros((10, 3))
    distances[:, 1] = -1  # every row would pick cluster 1
    assignment = balanced_assignment(distances)
    assert np.bincount(assignment, minlength=3).max() == 4 and (assignment >= 0).all()


def test_chunks_rejoin_to_the_document_and_cut_at_newlines():
    doc = Document("a", b"".join(f"line {i} of the text\n".encode() for i in range(500)))
    chunks = chunk_documents([doc], 1000)
    assert b"".join(c.data for c in chunks) == doc.data
    assert all(c.data.endswith(b"\n") for c in chunks)
    assert [c.name for c in chunks[:2]] == ["a#0", "a#1"] and all(750 <= len(c.data) <= 1250 for c in chunks[:-1])


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory, small_corpus) -> Path:
    """Folders ``prose`` (real Shakespeare) and ``code`` (this project's own sources)."""
    root = tmp_path_factory.mktemp("domains")
    (root / "prose").mkdir()
    (root / "code").mkdir()
    for path in sorted(small_corpus.iterdir()):
        (root / "prose" / path.name).write_bytes(path.read_bytes())
    # As many code files of the same size as prose texts: the clusters are balanced.
    sources = [p for p in sorted((Path(__file__).parents[1] / "src" / "seedbed").rglob("*.py")) if p.stat().st_size > 12000]
    for path in sources[:6]:
        (root / "code" / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes()[:12000])
    return root


def test_mixed_spec_splits_each_part_its_own_way(two_domains):
    prose, code = str(two_domains / "prose"), str(two_domains / "code")
    mixed = load_splits(f"{prose}+{code}")
    for split, prose_split, code_split in zip(mixed, load_splits(prose), load_splits(code)):
        assert [d.data for d in split] == [d.data for d in prose_split + code_split]
        assert split[0].name == f"{prose}/{prose_split[0].name}"
    with pytest.raises(UserError, match="distinct corpora"):
        load_splits(f"{prose}+{prose}")


# -- the whole workflow, through the CLI --------------------------------------------------------

def test_compose_cbtm_end_to_end(two_domains, tmp_path, capsys):
    """``seedbed compose cbtm`` from scratch on prose + code, then everything its result must do (one
    test: the workflow trains two experts, too dear to run again per check)."""
    out = tmp_path / "cbtm"
    spec = f"{two_domains / 'prose'}+{two_domains / 'code'}"
    assert main(["compose", "cbtm", "--data", spec, "--clusters", "2", "--chunk-bytes", "4096", "--steps", "10",
                 "--out", str(out), "model.d_model=48", "model.n_layers=2", "model.max_seq_len=64",
                 "model.mixer.n_heads=4", "train.batch_size=8", "train.dtype=fp32", "train.eval_tokens=512",
                 "train.device=cpu"]) == 0
    check_clusters_are_the_domains(out)
    check_router_agrees_with_the_clustering(out)
    check_composed_artifact_works_like_any(out, two_domains, tmp_path, capsys)
    check_compose_refuses_bad_input(out, tmp_path, capsys)
    # Composing the trained experts again (as from run folders trained anywhere) gives the same artifact.
    before = (out / "cbtm.seedbed").read_bytes()
    assert main(["compose", "cbtm", "--experts", str(out / "expert-0"), str(out / "expert-1")]) == 0
    assert (out / "cbtm.seedbed").read_bytes() == before


def test_compose_cbtm_branches_every_expert_from_a_seed_model(tiny_run, two_domains, tmp_path):
    """``--seed-model``: each expert is the seed's model, starting from its weights (with the learning
    rates at 0 its one step leaves them exactly there), on the seed's tokenizer."""
    out = tmp_path / "btm"
    spec = f"{two_domains / 'prose'}+{two_domains / 'code'}"
    assert main(["compose", "cbtm", "--seed-model", str(tiny_run), "--data", spec, "--chunk-bytes", "4096",
                 "--steps", "1", "--out", str(out), "train.lr=0", "train.matrix_lr=0", "train.eval_tokens=512",
                 "train.device=cpu"]) == 0
    seed = load(tiny_run).model.state_dict()
    for index in range(2):
        expert = load(out / f"expert-{index}")
        assert expert.config.model == load(tiny_run).config.model
        assert all(torch.equal(value, seed[name]) for name, value in expert.model.state_dict().items())


def test_init_from_refuses_another_model(tiny_run, small_corpus, tmp_path):
    from seedbed.config import resolve_config
    from seedbed.train.trainer import Trainer

    cfg = resolve_config("gpt", overrides=["model.d_model=32", "model.n_layers=2", "model.max_seq_len=64",
                                           "train.steps=1", "train.device=cpu", f'data.spec="{small_corpus}"',
                                           f'train.init_from="{tiny_run}"'])
    with pytest.raises(UserError, match="is not this run's model"):
        Trainer(cfg, tmp_path / "run", progress=False)


def check_clusters_are_the_domains(out: Path) -> None:
    fields = json.loads((out / "clusters.json").read_text())
    listing = [line.split("\t") for line in (out / "clusters.tsv").read_text().splitlines()[1:]]
    domain_of = {chunk: "prose" if "/prose/" in chunk else "code" for _, _, _, chunk in listing}
    by_cluster = {}
    for split, cluster, _, chunk in listing:
        if split == "train":
            by_cluster.setdefault(int(cluster), set()).add(domain_of[chunk])
    assert sorted(map(sorted, by_cluster.values())) == [["code"], ["prose"]], "the clusters are not the domains"
    held_out = [(int(cluster), domain_of[chunk]) for split, cluster, _, chunk in listing if split != "train"]
    own = {domain: cluster for cluster, (domain,) in by_cluster.items()}
    assert sum(cluster == own[domain] for cluster, domain in held_out) >= 0.9 * len(held_out)
    assert len(fields["splits"]["train"]) == sum(1 for row in listing if row[0] == "train")
    for index in range(2):  # each expert trained on exactly its cluster's chunks
        expert = load(out / f"expert-{index}")
        assert expert.config.data.spec.startswith(f"cluster:{index}:")
        assert {d.name for d in load_splits(expert.config.data.spec)[0]} == \
            {row[3] for row in listing if row[0] == "train" and int(row[1]) == index}


def check_router_agrees_with_the_clustering(out: Path) -> None:
    """The router (incremental, torch, from the artifact) and the clustering (sparse tf-idf, numpy)
    embed a text the same way: at a held-out chunk's last token, the heaviest cluster is the one
    the clusters file sent that chunk to."""
    loaded = load_artifact(out / "cbtm.seedbed")
    fields = json.loads((out / "clusters.json").read_text())
    _, val, test = load_splits(fields["spec"])
    for name, split in (("val", val), ("test", test)):
        for chunk, cluster in zip(chunk_documents(split, fields["chunk_bytes"]), fields["splits"][name], strict=True):
            tokens = torch.from_numpy(loaded.encode(chunk.data).astype(np.int64))[None]
            log_weights, _ = loaded.model.router.advance(tokens, loaded.model.router.init_state(1))
            assert int(log_weights[0, -1].argmax()) == cluster, chunk.name


def check_composed_artifact_works_like_any(out: Path, two_domains: Path, tmp_path: Path, capsys) -> None:
    artifact = out / "cbtm.seedbed"
    loaded = load_artifact(artifact)
    assert isinstance(loaded.model, CBTM) and len(loaded.model.members) == 2
    info = describe(artifact)
    assert "raw payload by part (cbtm):" in info and "members.1" in info and "router" in info
    capsys.readouterr()
    assert main(["eval", str(artifact), "--data", str(two_domains / "code")]) == 0
    assert "bpb" in capsys.readouterr().out
    text = tmp_path / "sample.py"
    text.write_bytes((Path(__file__).parents[1] / "src" / "seedbed" / "errors.py").read_bytes())
    packed, restored = tmp_path / "sample.sbz", tmp_path / "restored.py"
    assert main(["compress", str(artifact), str(text), "-o", str(packed)]) == 0
    assert main(["decompress", str(artifact), str(packed), "-o", str(restored)]) == 0
    assert restored.read_bytes() == text.read_bytes()
    capsys.readouterr()
    assert main(["generate", str(artifact), "--prompt", "def ", "--tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    again = tmp_path / "again.seedbed"  # re-packing a loaded composed artifact keeps it
    pack_model(loaded, again, QuantRule.parse("fp32"))
    tokens = torch.from_numpy(loaded.encode(b"def main():\n    pass\n" * 3).astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(again).model.log_probs(tokens), loaded.model.log_probs(tokens),
                                   rtol=0, atol=1e-6)


def check_compose_refuses_bad_input(out: Path, tmp_path: Path, capsys) -> None:
    def run(*args) -> list[str]:
        capsys.readouterr()
        assert main(["compose", "cbtm", *args]) == 2
        return capsys.readouterr().err.strip().splitlines()

    lines = run("--steps", "1", "--out", str(out))
    assert len(lines) == 1 and "not empty" in lines[0]
    lines = run("--experts", str(out / "expert-1"), str(out / "expert-0"))
    assert len(lines) == 1 and "in that order" in lines[0]
    lines = run("--clusters", "2", "--top-k", "3", "--steps", "1", "--out", str(tmp_path / "x"))
    assert len(lines) == 1 and "--top-k" in lines[0]
    assert not (tmp_path / "x").exists()
    clusters = out / "clusters.json"
    damaged = tmp_path / "clusters.json"
    damaged.write_text(clusters.read_text().replace('"clusters": 2', '"clusters": 3'))
    with pytest.raises(UserError, match="checksum"):
        load_splits(f"cluster:0:{damaged}")
    with pytest.raises(UserError, match="clusters 0..1"):
        load_splits(f"cluster:2:{clusters}")


# -- PHATGOOSE ------------------------------------------------------------------------------------

def small_phatgoose(experts: int = 3, top_k: int = 2, seed: int = 0) -> PhatGoose:
    """A routed PHATGOOSE over small_model whose modules and gates are all nonzero."""
    model = PhatGoose(small_model(seed=seed), experts, rank=4, top_k=top_k)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for library in model.libraries():
            library.lora_b.normal_(0, 0.2, generator=g)
            library.gates.normal_(0, 1, generator=g)
    return model.eval()


def test_phatgoose_routing_equals_the_plain_reference():
    library = small_phatgoose().libraries()[0]
    x = torch.randn(2, 5, library.base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(library(x), reference_routed(library, x), rtol=1e-5, atol=1e-5)


def test_phatgoose_with_fresh_modules_equals_the_base_and_a_closed_gate_adds_nothing():
    base = small_model(seed=3)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = base(tokens)
        model = PhatGoose(base, 2, rank=4).eval()  # B = 0: every module adds nothing
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
        library = model.libraries()[0]
        library.lora_b.normal_(0, 0.2)
        x = torch.randn(library.base.in_features)
        model.set_mode("expert", 1)
        opened = library(x)
        model.set_mode("gate", 1)
        for sign, wanted in ((-1, library.base(x)), (1, opened)):
            library.gates[1] = sign * 1e4 * x / x.norm()  # sigmoid(g . x) = 0 (closed) or 1 (open)
            torch.testing.assert_close(library(x), wanted, rtol=0, atol=1e-6)
        assert not torch.allclose(opened, library.base(x), atol=1e-3)


def test_phatgoose_is_causal():
    check_causal(small_phatgoose(), seed=7)


@pytest.mark.parametrize("training", [False, True])
def test_phatgoose_step_by_step_equals_parallel(training):
    check_step_equals_parallel(small_phatgoose().train(training), seed=8)


def test_phatgoose_training_moves_only_the_module_then_only_the_gate():
    model = PhatGoose(small_model(seed=4), 1, rank=4)
    frozen = {name: t.clone() for name, t in model.model.state_dict().items() if not name.endswith(("lora_a", "lora_b", "gates"))}
    tokens = torch.from_numpy(np.frombuffer(PROSE * 40, np.uint8).astype(np.int64)) % VOCAB
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(tokens[None, :-1]).flatten(0, 1), tokens[1:]).item()
    stats = train_module(model, tokens, batch_size=4, lr=3e-3, seed=0, budget={"steps": 30}, gate_budget={"steps": 5})
    assert stats["module_loss"] < before - 0.5, (before, stats)
    for name, tensor in model.model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), f"{name} changed"
    assert all(library.gates.abs().sum() > 0 and library.lora_b.abs().sum() > 0 for library in model.libraries())


def test_phatgoose_artifact_round_trips_and_codes(tmp_path, tiny_model):
    # PhatGoose takes its base over (its linears become LoRA libraries): never the shared fixture.
    model = PhatGoose(copy.deepcopy(tiny_model.model), 2, rank=4, top_k=1)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for library in model.libraries():
            library.lora_b.normal_(0, 0.05, generator=g)
            library.gates.normal_(0, 1, generator=g)
    loaded = LoadedModel(model.eval(), tiny_model.config, tiny_model.tokenizer, tmp_path)
    artifact = tmp_path / "goose.seedbed"
    pack_model(loaded, artifact, QuantRule.parse("fp32"))
    reloaded = load_artifact(artifact)
    assert isinstance(reloaded.model, PhatGoose) and reloaded.model.top_k == 1
    tokens = torch.from_numpy(tiny_model.encode(PROSE * 2).astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.log_probs(tokens), model.log_probs(tokens), rtol=0, atol=1e-6)
    assert "LoRA modules and gates" in describe(artifact)
    text, packed, restored = tmp_path / "t.txt", tmp_path / "t.sbz", tmp_path / "r.txt"
    text.write_bytes(PROSE * 2)
    assert main(["compress", str(artifact), str(text), "-o", str(packed), "--no-eval"]) == 0
    assert main(["decompress", str(artifact), str(packed), "-o", str(restored)]) == 0
    assert restored.read_bytes() == text.read_bytes()


def test_compose_phatgoose_end_to_end(tiny_run, two_domains, tmp_path):
    out = tmp_path / "goose"
    spec = f"{two_domains / 'prose'}+{two_domains / 'code'}"
    assert main(["compose", "phatgoose", "--base", str(tiny_run), "--data", spec, "--clusters", "2",
                 "--chunk-bytes", "4096", "--minutes", "0.02", "--gate-steps", "4", "--batch-size", "4", "--rank", "4",
                 "--out", str(out)]) == 0
    loaded = load_artifact(out / "phatgoose.seedbed")
    assert isinstance(loaded.model, PhatGoose) and loaded.model.experts == 2
    base = load(tiny_run)
    tokens = torch.from_numpy(base.encode(CODE * 2).astype(np.int64))[None]
    with torch.no_grad():
        assert not torch.allclose(loaded.model.log_probs(tokens), base.model.log_probs(tokens), atol=1e-4)


def test_train_steps_takes_a_budget_of_steps_or_seconds():
    from seedbed.compose.fit import train_steps

    model = small_model(seed=0)
    tokens = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0))
    by_steps = train_steps(model, tokens, 2, 1e-3, torch.Generator().manual_seed(0), steps=3)
    by_time = train_steps(model, tokens, 2, 1e-3, torch.Generator().manual_seed(0), seconds=0.3)
    assert by_steps.steps == 3 and by_time.steps >= 1 and by_time.seconds >= 0.3
    with pytest.raises(ValueError):
        train_steps(model, tokens, 2, 1e-3, torch.Generator(), steps=3, seconds=1.0)


# -- CALM -----------------------------------------------------------------------------------------

def small_calm(open_bridges: bool = True) -> CALM:
    """An anchor of 2 layers reading an augmenting model of 3 (another width) after its every layer."""
    model = CALM(small_model(seed=0), small_model(seed=1, d_model=24, n_layers=3), every=1, heads=4)
    if open_bridges:
        with torch.no_grad():
            for bridge in model.bridges:
                bridge.out.weight.normal_(0, 0.2)
    return model.eval()


def test_calm_bridge_equals_the_plain_reference():
    bridge = small_calm().bridges[0]
    g = torch.Generator().manual_seed(0)
    h, augmenting = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 24, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(bridge(h, augmenting)[0], reference_bridge(bridge, h, augmenting),
                                   rtol=1e-5, atol=1e-5)


def test_calm_with_zero_bridges_equals_the_anchor():
    model = small_calm(open_bridges=False)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.anchor(tokens), rtol=0, atol=0)
    assert model.anchor_layers == [0, 1] and model.augmenting_layers == [1, 2]


def test_calm_is_causal_and_reads_the_augmenting_model():
    model = small_calm()
    check_causal(model, seed=11)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert not torch.allclose(model(tokens), model.anchor(tokens), atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
def test_calm_step_by_step_equals_parallel(training):
    check_step_equals_parallel(small_calm().train(training), seed=12)


def test_compose_calm_trains_only_the_bridges_and_round_trips(tiny_run, small_corpus, tmp_path):
    artifact = tmp_path / "calm.seedbed"
    assert main(["compose", "calm", "--anchor", str(tiny_run), "--augmenting", str(tiny_run), "--data",
                 str(small_corpus), "--steps", "6", "--batch-size", "4", "-o", str(artifact)]) == 0
    loaded, tiny = load_artifact(artifact), load(tiny_run)
    assert isinstance(loaded.model, CALM) and len(loaded.model.bridges) == 1  # 2 layers, every 2nd
    for part in (loaded.model.anchor, loaded.model.augmenting):  # the frozen models, as packed int8
        for name, tensor in part.state_dict().items():
            torch.testing.assert_close(tensor, tiny.model.state_dict()[name], rtol=0.05, atol=0.02)
    assert loaded.model.bridges[0].out.weight.abs().sum() > 0
    assert "bridges" in describe(artifact)
    text, packed, restored = tmp_path / "t.txt", tmp_path / "t.sbz", tmp_path / "r.txt"
    text.write_bytes(PROSE * 2)
    assert main(["compress", str(artifact), str(text), "-o", str(packed)]) == 0
    assert main(["decompress", str(artifact), str(packed), "-o", str(restored)]) == 0
    assert restored.read_bytes() == text.read_bytes()
    # Score-first adaptation trains the frozen models' copies too (CALM keeps them frozen).
    assert main(["eval", str(artifact), "--text", str(text), "--adapt", "--adapt-every", "32"]) == 0
