import pytest

from seedbed.config import ModelConfig, apply_overrides, config_from_dict, preset_names, resolve_config
from seedbed.errors import UserError
from seedbed.model import LM


def test_presets_resolve_and_build():
    assert {"gpt", "golf-gpt"} <= set(preset_names())
    golf = resolve_config("golf-gpt")
    assert (golf.model.n_layers, golf.model.d_model) == (5, 512)
    assert golf.model.mixer == {"kind": "attention", "n_heads": 8, "n_kv_heads": 4, "qk_norm": True}
    assert golf.model.ffn["activation"] == "leaky_relu2" and golf.data.tokenizer == "sp"
    assert golf.model.tie_embeddings


def test_overrides_parse_toml_values_and_nested_keys():
    cfg = resolve_config("gpt", overrides=["model.d_model=128", "train.lr=0.001", "model.mixer.n_heads=2",
                                          "train.optimizer=adamw", "model.tie_embeddings=false"])
    assert cfg.model.d_model == 128 and cfg.train.lr == 0.001 and cfg.model.mixer["n_heads"] == 2
    assert cfg.train.optimizer == "adamw" and cfg.model.tie_embeddings is False


def test_config_round_trips_through_toml():
    import tomllib

    cfg = resolve_config("golf-gpt", overrides=["train.steps=5"])
    again = config_from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize("overrides,message", [
    (["model.widht=3"], "unknown config key model.widht"),
    (["train.lr=-1"], "train.lr must be >= 0"),
    (["model.d_model=0"], "model.d_model must be positive"),
    (["model.n_layers=two"], "model.n_layers: expected an integer"),
    (["train.optimizer=sgd"], "train.optimizer must be muon or adamw"),
    (["bogus.key=1"], "unknown config section 'bogus'"),
    (["lr=3"], "must name a section and a key"),
    (["train.lr"], "must look like section.key=value"),
])
def test_bad_config_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_config("gpt", overrides=overrides)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        resolve_config("nope")


@pytest.mark.parametrize("mixer,message", [
    ({"kind": "attention", "n_heads": 3}, "n_heads=3 does not divide model.d_model=32"),
    ({"kind": "attention", "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3 does not divide"),
    ({"kind": "attention", "n_hedas": 4}, "unknown config key model.mixer.n_hedas"),
    ({"kind": "lstm"}, "unknown mixer 'lstm'"),
])
def test_bad_component_options(mixer, message):
    with pytest.raises(UserError, match=message):
        LM(ModelConfig(d_model=32, mixer=mixer))


def test_override_into_non_table():
    with pytest.raises(UserError, match="is not a table"):
        apply_overrides({"model": {"d_model": 3}}, ["model.d_model.x=1"])
