"""The layer stack: layer plans, shared parts stored once with gradients summed over their uses,
per-use adapters, decode state per use, and the parameter counts. (Causality and step == parallel
for mixed stacks run with every component in test_model.py.)"""

import pytest
import torch

from seedbed.config import ModelConfig, RunConfig, config_from_dict
from seedbed.data.tokenizer import ByteTokenizer
from seedbed.errors import UserError
from seedbed.loaded import LoadedModel
from seedbed.model import LM, count_parameters, effective_parameters, virtual_parameters
from seedbed.pack.artifact import QuantRule, read_artifact
from seedbed.pack.pack import load_artifact, pack_model
from test_model import small_model


def test_layer_plan_cycles_the_pattern_and_applies_depth_overrides():
    cfg = ModelConfig(n_layers=8, pattern=["default*3", "attn"], depths={"1": "attn"},
                      blocks={"attn": {"mixer": {"kind": "attention"}}})
    assert cfg.layer_plan() == ["default", "attn", "default", "attn", "default", "default", "default", "attn"]
    assert ModelConfig(n_layers=3).layer_plan() == ["default"] * 3


@pytest.mark.parametrize("model,message", [
    ({"n_layers": 5, "pattern": ["default*2"]}, "pattern covers 2 layers, which does not divide n_layers=5"),
    ({"pattern": ["nope"]}, "model.pattern: unknown block 'nope'"),
    ({"pattern": ["default*0"]}, "must be a block name or name\\*count"),
    ({"depths": {"9": "default"}}, "model.depths: '9' is not a depth in 0..5"),
    ({"blocks": {"a": {"lora_rank": 4}}}, "model.blocks.a.lora_rank adapts shared parameters"),
    ({"blocks": {"a": {"share": "all"}}}, "model.blocks.a.share must be one of none, ffn, mixer, block"),
    ({"blocks": {"a": {"input": "tokens"}}}, "model.blocks.a.input must be one of"),
    ({"blocks": {"a": {"widht": 3}}}, "unknown config key model.blocks.a.widht"),
    ({"blocks": {"a-b": {}}}, "block name 'a-b' must be a plain identifier"),
])
def test_bad_stacks_are_one_line_errors(model, message):
    with pytest.raises(UserError, match=message):
        config_from_dict({"model": model})


def unshared_copy(shared: LM) -> LM:
    """The same network with every depth holding its own copy of the shared parts."""
    cfg = ModelConfig(**{**vars(shared.cfg), "blocks": {}})
    copy = LM(cfg)
    state = {}
    for name, tensor in shared.state_dict().items():
        if name.startswith("shared.default."):
            for depth in range(cfg.n_layers):
                state[f"blocks.{depth}.{name.removeprefix('shared.default.')}"] = tensor
        else:
            state[name] = tensor
    copy.load_state_dict(state, strict=True)
    return copy


def test_shared_block_is_stored_once_and_its_gradient_sums_over_uses(tmp_path):
    shared = small_model(n_layers=3, blocks={"default": {"share": "block"}})
    copy = unshared_copy(shared)
    names = list(shared.state_dict())
    assert "shared.default.mixer.q.weight" in names and not any(".mixer.q." in n for n in names if n.startswith("blocks."))
    part = sum(p.numel() for p in shared.shared.default.parameters())
    assert count_parameters(copy) == count_parameters(shared) + 2 * part
    assert effective_parameters(shared) == count_parameters(copy) == effective_parameters(copy)
    assert virtual_parameters(shared) == count_parameters(shared)

    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shared(tokens), copy(tokens))
    shared.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    copy.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    for name, param in shared.shared.default.named_parameters():
        summed = sum(copy.get_parameter(f"blocks.{d}.{name}").grad for d in range(3))
        torch.testing.assert_close(param.grad, summed, rtol=1e-5, atol=1e-7)
    # Per-use parts (norms) keep their own gradients.
    torch.testing.assert_close(shared.blocks[1].mixer_norm.weight.grad, copy.blocks[1].mixer_norm.weight.grad,
                               rtol=1e-5, atol=1e-7)

    # The artifact holds the shared tensors once, and loads back to the same network.
    cfg = RunConfig(model=shared.cfg)
    small = pack_model(LoadedModel(shared, cfg, ByteTokenizer(), tmp_path), tmp_path / "shared.seedbed",
                       QuantRule.parse("fp32"))
    big = pack_model(LoadedModel(copy, RunConfig(model=copy.cfg), ByteTokenizer(), tmp_path),
                     tmp_path / "copy.seedbed", QuantRule.parse("fp32"))
    entries = [e["name"] for e in read_artifact(small.path).manifest["tensors"]]
    assert entries.count("shared.default.mixer.q.weight") == 1 and len(entries) == len(set(entries))
    assert big.payload_size - small.payload_size >= 2 * part * 4
    shared.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(small.path).model(tokens), shared(tokens))


def test_per_use_lora_starts_as_the_shared_block_and_adapts_each_use_apart():
    spec = {"share": "block", "lora_rank": 4}
    plain = small_model(n_layers=3, blocks={"default": {"share": "block"}})
    torch.manual_seed(1)
    adapted = LM(ModelConfig(**{**vars(plain.cfg), "blocks": {"default": spec}}))
    # An adapted linear keeps its shared weight as ``base``, beside the per-use A and B.
    renamed = {name.replace(".weight", ".base.weight") if name.startswith("shared.") and "_norm" not in name
               else name: tensor for name, tensor in plain.state_dict().items()}
    missing, unexpected = adapted.load_state_dict(renamed, strict=False)
    assert not unexpected and missing and all(".lora_" in name for name in missing)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapted(tokens), plain(tokens))  # every B_u starts at zero
    q = adapted.shared.default.mixer.q
    assert q.lora_a.shape == (3, 4, 32) and q.lora_b.shape == (3, 32, 4)
    adapted.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    assert all(q.lora_b.grad[use].abs().sum() > 0 for use in range(3)), "every use trains its own adapter"
    # Changing use 2's adapter changes nothing before depth 2: the hidden state entering it is the same.
    with torch.no_grad():
        hidden = []
        hooks = [layer.register_forward_hook(lambda m, i, o: hidden.append(o)) for layer in adapted.blocks]
        adapted(tokens)
        q.lora_b[2].normal_()
        adapted(tokens)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(hidden[4], hidden[1])
    assert not torch.allclose(hidden[5], hidden[2])
    assert effective_parameters(adapted) - effective_parameters(plain) == q.lora_a.numel() + q.lora_b.numel() + sum(
        a.lora_a.numel() + a.lora_b.numel() for a in adapted.shared.default.adapters if a is not q)


def test_zamba_keeps_kv_caches_only_for_the_shared_blocks_uses():
    from seedbed.config import resolve_config

    torch.manual_seed(0)
    model = LM(resolve_config("zamba", overrides=["model.d_model=32"]).model)
    state = model.init_state(2, 64)
    mamba, attention = ["conv", "ssm"], ["k", "pos", "v"]
    assert [sorted(s) for s in state] == [mamba] * 3 + [attention] + [mamba] * 3 + [attention]
    assert state[3]["k"] is not state[7]["k"]
    assert model.blocks[3].mixer is model.blocks[7].mixer is model.shared.attn.mixer
    assert model.blocks[0].ffn is None and "blocks.0.ffn_norm.weight" not in model.state_dict()
    # Mamba-2 states do not grow with the context; only the two KV caches do.
    longer = model.init_state(2, 256)
    size = lambda s: sum(t.numel() for t in s.values() if isinstance(t, torch.Tensor))
    assert all(size(a) == size(b) for a, b, name in zip(state, longer, model.cfg.layer_plan()) if name == "default")
    assert all(size(b) == 4 * size(a) for a, b, name in zip(state, longer, model.cfg.layer_plan()) if name == "attn")


def test_effective_parameters_count_each_use_of_a_shared_ffn():
    tiny = small_model(n_layers=4, blocks={"default": {"share": "ffn"}})
    gpt = small_model(n_layers=4)
    ffn = sum(p.numel() for p in tiny.shared.default.parameters())
    assert count_parameters(gpt) - count_parameters(tiny) == 3 * ffn
    assert effective_parameters(tiny) == count_parameters(gpt)


# Narrowed to width 32 and to half the depth (the zamba pattern to M A M A), keeping every kind of
# layer and two uses of each shared part: the trainer's final eval of the whole val split dominates.
SHALLOW = {"mamba2": ["model.n_layers=3"], "zamba": ["model.n_layers=4", 'model.pattern=["default", "attn"]'],
           "tiny": ["model.n_layers=2"], "universal": ["model.n_layers=2"]}


@pytest.mark.parametrize("preset", list(SHALLOW))
def test_stack_presets_train_on_the_default_corpus_and_pack_exactly(preset, tmp_path):
    """Each layer-stack preset trains through the CLI on the real corpus, and its fp32 artifact scores
    exactly what the run scores; shared parts count once per use."""
    from test_train import seedbed

    from seedbed.pack.pack import describe
    from seedbed.runs import load

    run = tmp_path / "run"
    out = seedbed("train", "--preset", preset, "--steps", "3", "--out", str(run), "--no-progress", *SHALLOW[preset],
                  "model.d_model=32", "train.batch_size=4", "train.eval_stride=128", "train.threads=1", "train.device=cpu")
    assert out.returncode == 0, out.stderr
    assert "42 docs" in out.stderr and "val bpb" in out.stdout
    loaded = load(run)
    packed = pack_model(loaded, tmp_path / "model.seedbed", QuantRule.parse("fp32"))
    text = b"HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
    assert load_artifact(packed.path).evaluate(text).bpb == loaded.evaluate(text).bpb
    stored, virtual, effective = (int(describe(packed.path).split(f" {kind}")[0].split()[-1].replace(",", ""))
                                  for kind in ("stored", "virtual", "effective"))
    assert stored == virtual == count_parameters(loaded.model)
    assert (effective > stored) == (preset in ("zamba", "tiny", "universal"))


def test_a_shared_mixture_of_experts_adds_up_the_balance_loss_of_every_use():
    from seedbed.model import moe

    shared = small_model(n_layers=3, ffn={"kind": "moe", "n_routed": 4}, blocks={"default": {"share": "ffn"}}).train()
    copy = unshared_copy(shared)
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    shared(tokens)
    shared(tokens)  # a second forward starts a new sum
    total = moe.auxiliary_loss(shared)
    copy(tokens)
    expected = moe.auxiliary_loss(copy)
    assert all(copy.blocks[d].ffn.aux_loss > 0 for d in range(3))
    torch.testing.assert_close(total, expected)
