"""The hourglass stage (model/hourglass.py): exactly which positions each output reads, the batched
compression and upsampling against plain loops, decoding per level, nesting, the latent loss, and
the config errors. (Causality and step == parallel through whole models, in eval and training
mode, run for the hourglass stacks of test_model.py.)"""

import pytest
import torch

from seedbed.config import config_from_dict
from seedbed.errors import UserError
from seedbed.model import LM, moe
from seedbed.model.hourglass import Hourglass
from test_model import decode_three_ways, small_model

STAGES = {
    "perceiver-replicate": {},
    "perceiver-attention-2-latents": {"upsample": "attention", "latents": 2},
    "last-replicate-group-3": {"compress": "last", "group": 3, "latents": 3},
    "last-attention": {"compress": "last", "upsample": "attention", "latents": 2},
    "group-1": {"group": 1, "upsample": "attention"},
}
ATTENTION = {"kind": "attention", "n_heads": 4}
LOCAL_GLOBAL = {"local": {"scope": "local", "mixer": ATTENTION}, "inner_hourglass": {
    "mixer": {"kind": "hourglass", "group": 2, "upsample": "attention", "inner": ["transformer"]},
    "ffn": {"kind": "none"}}}
NESTED = {"latents": 2, "inner": ["local", "inner_hourglass", "transformer"]}


def stage(options: dict, blocks: dict | None = None, seed: int = 0, **overrides) -> Hourglass:
    """The hourglass of a 1-layer model, every weight perturbed (the output projection starts at zero)."""
    mixer = {"kind": "hourglass", **options}
    return small_model(mixer=mixer, n_layers=1, blocks=blocks or {}, seed=seed, **overrides).blocks[0].mixer


def read_positions(mixer: Hourglass, length: int) -> torch.Tensor:
    """(T, T) boolean: output t has a nonzero gradient with respect to input s."""
    u = torch.randn(1, length, 32, requires_grad=True)
    out = mixer(u)
    rows = []
    for t in range(length):
        (grad,) = torch.autograd.grad(out[0, t].square().sum(), u, retain_graph=True)
        rows.append(grad[0].abs().sum(-1) > 0)
    return torch.stack(rows)


@pytest.mark.parametrize("options", STAGES.values(), ids=STAGES.keys())
def test_each_output_reads_its_latest_complete_group_and_nothing_later(options):
    """Exactly the documented set, at a length the group does not divide: with t = jk + r, y_t reads
    u_0 .. u_jk (the groups completed by t, shifted by k - 1), and with attention upsampling u_t too;
    replicating a "last" latent slot a reads only u_0 .. u_{jk - K + 1 + a} (a causal group encoder)."""
    mixer = stage(options)
    k, n_latents, length = mixer.group, mixer.latents, 13
    t, s = torch.arange(length)[:, None], torch.arange(length)[None, :]
    end = k * (t // k)
    if mixer.compression == "last" and mixer.upsampling == "replicate":
        end = end - n_latents + 1 + (t % k) * n_latents // k
    expected = s <= end
    if mixer.upsampling == "attention":
        expected |= s == t
    assert torch.equal(read_positions(mixer, length), expected)


def test_a_nested_stage_still_reads_nothing_later():
    mixer = stage(NESTED, LOCAL_GLOBAL)
    read = read_positions(mixer, 14)
    t, s = torch.arange(14)[:, None], torch.arange(14)[None, :]
    assert not read[s > t].any()
    assert read[s <= mixer.group * (t // mixer.group)].all()


@pytest.mark.parametrize("options", list(STAGES.values()) + [NESTED], ids=list(STAGES) + ["nested"])
def test_batched_compression_and_upsampling_equal_the_plain_loops(options):
    blocks = LOCAL_GLOBAL if options is NESTED else None
    fast, plain = stage(options, blocks), stage({**options, "reference": True}, blocks)
    plain.load_state_dict(fast.state_dict())
    u = torch.randn(2, 19, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(u), fast(u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", list(STAGES.values()) + [NESTED], ids=list(STAGES) + ["nested"])
def test_decoding_per_level_equals_the_parallel_stage(options):
    """One position at a time, and prefills ending inside and at the edge of groups, at a length
    the group does not divide: the same outputs as the parallel stage."""
    mixer = stage(options, LOCAL_GLOBAL if options is NESTED else None)
    full, single, chunked, state, _ = decode_three_ways(mixer, torch.randn(2, 23, 32), [5, 8, 9, 16])
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert state["pos"] == 23 and state["tail"].shape[1] == mixer.group - 1
    if mixer.upsampling == "attention":
        assert state["count"] == mixer.latent_length(23)


def test_local_blocks_see_only_their_own_group():
    """A local inner block with attention: changing one group's latent changes no other group."""
    mixer = stage({"latents": 2, "inner": ["local"]}, {"local": {"scope": "local", "mixer": ATTENTION}})
    layer = mixer.inner[0]
    z = torch.randn(1, 8, 32)
    with torch.no_grad():
        before = layer(z, z, None)
        changed = z.clone()
        changed[:, 4] += 1.0  # group 2, first latent
        after = layer(changed, z, None)
    moved = (after - before).abs().sum(-1)[0] > 0
    assert moved.tolist() == [False, False, False, False, True, True, False, False]


def test_the_latent_loss_trains_the_predictor_only_in_training():
    mixer = stage({"latent_loss": 0.5, "latents": 2})
    u = torch.randn(2, 16, 32)
    mixer.train()
    mixer(u)
    loss = mixer.aux_loss
    n, d = 4, 32
    # The same quantity by hand: group j's final latents predict group j+1's compressed latents.
    with torch.no_grad():
        full = torch.cat([torch.zeros(2, 3, d), u], 1)
        latents = mixer.compress(full[:, :16].reshape(2, n, 4, d))
        z0 = latents.reshape(2, n * 2, d)
        z = z0
        for layer in mixer.inner:
            z = layer(z, z0, None)
        z = mixer.latent_norm(z).view(2, n, 2, d)
        rms = lambda x: torch.nn.functional.rms_norm(x, (d,))
        expected = 0.5 * ((rms(mixer.predictor(z[:, :-1])) - rms(latents[:, 1:])) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert mixer.predictor.weight.grad.abs().sum() > 0
    mixer.eval()
    mixer(u)
    assert mixer.aux_loss is None


def test_the_latent_loss_joins_the_training_loss_of_the_model():
    model = small_model(mixer={"kind": "hourglass", "latent_loss": 1.0}, n_layers=1).train()
    tokens = torch.randint(0, 61, (2, 17))
    plain = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 61), tokens[:, 1:].reshape(-1))
    assert moe.auxiliary_loss(model) > 0
    torch.testing.assert_close(model.loss(tokens[:, :-1], tokens[:, 1:]), plain + moe.auxiliary_loss(model))
    assert model.eval().loss(tokens[:, :-1], tokens[:, 1:]) == plain.detach()


def test_a_stage_shared_by_two_depths_adds_up_the_latent_loss_of_both_uses():
    from test_stack import unshared_copy

    shared = small_model(mixer={"kind": "hourglass", "latent_loss": 0.5}, ffn={"kind": "none"}, n_layers=2,
                         blocks={"default": {"share": "mixer"}}).train()
    copy = unshared_copy(shared).train()
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    shared(tokens)
    shared(tokens)  # a second forward starts a new sum
    copy(tokens)
    assert all(copy.blocks[d].mixer.aux_loss > 0 for d in range(2))
    torch.testing.assert_close(moe.auxiliary_loss(shared), moe.auxiliary_loss(copy))


def test_a_new_stage_is_the_identity_and_learns():
    """W_out starts at zero: an untrained hourglass layer adds nothing, and one step moves it."""
    torch.manual_seed(0)
    model = LM(config_from_dict({"model": {"vocab_size": 61, "d_model": 32, "n_layers": 1, "max_seq_len": 32,
                                           "mixer": {"kind": "hourglass"}, "ffn": {"kind": "none"}}}).model)
    tokens = torch.randint(0, 61, (2, 20))
    h = model.embed(tokens)
    torch.testing.assert_close(model.blocks[0](h, h, tokens), h)
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    assert model.blocks[0].mixer.out.weight.grad.abs().sum() > 0


def test_the_parameter_names_say_where_each_part_sits():
    model = small_model(mixer={"kind": "hourglass", **NESTED}, blocks=LOCAL_GLOBAL, n_layers=1)
    names = {name for name, _ in model.named_parameters()}
    assert {"blocks.0.mixer.latent_query_embedding", "blocks.0.mixer.group_position_embedding",
            "blocks.0.mixer.inner.0.mixer.q.weight",
            "blocks.0.mixer.inner.1.mixer.inner.0.mixer.q.weight"} <= names


@pytest.mark.parametrize("model,message", [
    ({"blocks": {"l": {"scope": "local"}}, "pattern": ["default", "l"]},
     "model.blocks.l.scope = 'local' runs over the latents of one group: name it only in an hourglass"),
    ({"blocks": {"h": {"mixer": {"kind": "hourglass", "inner": ["h"]}}}, "pattern": ["h"]},
     "model.blocks.h: an hourglass cannot contain itself \\(h -> h\\)"),
    ({"blocks": {"h": {"mixer": {"kind": "hourglass", "inner": ["nope*2"]}}}, "pattern": ["h"]},
     "model.blocks.h.mixer.inner: unknown block 'nope'"),
    ({"blocks": {"h": {"mixer": {"kind": "hourglass", "inner": ["m"]}}, "m": {"ffn": {"kind": "modulo-experts"}}},
      "pattern": ["h"]}, "model.blocks.m.ffn: modulo-experts routes by token id"),
    ({"mixer": {"kind": "hourglass", "latents": 5}}, "model.mixer.latents must be in 1..group=4, got 5"),
    ({"mixer": {"kind": "hourglass", "compress": "mean"}}, "model.mixer.compress must be one of perceiver, last"),
    ({"mixer": {"kind": "hourglass", "upsample": "linear"}}, "model.mixer.upsample must be one of replicate, attention"),
    ({"mixer": {"kind": "hourglass", "n_heads": 3}}, "model.mixer.n_heads=3 does not divide model.d_model=256"),
    ({"mixer": {"kind": "hourglass", "denseformer": {"dilation": -1}}}, "model.mixer.denseformer.dilation must be >= 0"),
    ({"blocks": {"a": {"scope": "inner"}}}, "model.blocks.a.scope must be one of global, local"),
])
def test_bad_hourglass_configs_are_one_line_errors(model, message):
    with pytest.raises(UserError, match=message):
        LM(config_from_dict({"model": model}).model)


# The preset at width 32 with a shorter latent stack: every kind of part kept (byte layers, group
# encoder, local, global and multi-channel latent blocks, Denseformer, attention upsampling).
SHALLOW_HOURGLASS = ["model.d_model=32", 'model.blocks.valley.mixer.inner=["local", "latent", "default"]',
                     "train.batch_size=4", "train.eval_stride=128", "train.threads=1", "train.device=cpu"]


def test_the_hourglass_preset_trains_packs_and_compresses_byte_exactly(tmp_path):
    """Through the CLI on the real corpus: the run learns (its artifact beats the untrained model on
    held-out text), the fp32 artifact scores exactly what the run scores, and the int8 artifact
    compresses and decompresses byte-exactly at the bpb it evaluates to."""
    from test_train import seedbed

    from preset_checks import HAMLET, check_learns_and_packs_exactly

    from seedbed.codec import artifact_digest, compress_bytes, decompress_bytes
    from seedbed.pack.artifact import QuantRule
    from seedbed.pack.pack import load_artifact, pack_model

    run = tmp_path / "run"
    out = seedbed("train", "--preset", "hourglass", "--steps", "25", "--out", str(run), "--no-progress",
                  *SHALLOW_HOURGLASS)
    assert out.returncode == 0, out.stderr
    loaded = check_learns_and_packs_exactly(run, tmp_path)
    path = pack_model(loaded, tmp_path / "int8.seedbed", QuantRule.parse("int8")).path
    artifact, digest = load_artifact(path), artifact_digest(path)
    blob, stats = compress_bytes(artifact, digest, HAMLET)
    assert decompress_bytes(artifact, digest, blob)[0] == HAMLET
    assert abs(stats.bpb / artifact.evaluate(HAMLET).bpb - 1) < 0.01
