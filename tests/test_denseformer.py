"""Denseformer depth-weighted averages (model/denseformer.py), over the model's stack and an
hourglass's inner stack. (Causality and step == parallel run in test_model.py's stacks.)"""

import pytest
import torch

from seedbed.config import DenseformerOptions, config_from_dict
from seedbed.errors import UserError
from seedbed.model.denseformer import DepthWeightedAverage
from test_model import small_model


def test_sources_follow_dilation_and_period():
    dwa = DepthWeightedAverage(6, DenseformerOptions(dilation=2, period=2))
    assert dwa.sources == {2: [0, 2], 4: [0, 2, 4], 6: [0, 2, 4, 6]}
    dense = DepthWeightedAverage(3, DenseformerOptions(dilation=1))
    assert dense.sources == {1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3]}
    assert all(w.tolist() == [0.0] * (len(w) - 1) + [1.0] for w in dense.weights.values())


def test_the_average_equals_the_dense_reference():
    dwa = DepthWeightedAverage(5, DenseformerOptions(dilation=2, period=1))
    with torch.no_grad():
        for weights in dwa.weights.values():
            weights.normal_()
    history = [torch.randn(2, 7, 8) for _ in range(6)]
    for depth in range(1, 6):
        torch.testing.assert_close(dwa(depth, history), dwa.reference(depth, history))


@pytest.mark.parametrize("where", ["model", "hourglass"])
def test_an_initialised_denseformer_is_the_model_without_it(where):
    """Every weight vector starts one-hot on its own depth: the same logits as without averaging."""
    dwa = {"dilation": 1, "period": 1}
    if where == "model":
        with_dwa, plain = small_model(n_layers=3, denseformer=dwa), small_model(n_layers=3)
    else:
        mixer = {"kind": "hourglass", "inner": ["transformer*3"]}
        with_dwa = small_model(mixer={**mixer, "denseformer": dwa}, n_layers=1)
        plain = small_model(mixer=mixer, n_layers=1)
    state = plain.state_dict()
    missing, unexpected = with_dwa.load_state_dict(state, strict=False)
    assert not unexpected and missing and all("denseformer.weights" in name for name in missing)
    # small_model perturbed the averaging weights too: put them back at their initial one-hot values.
    dwa_module = with_dwa.denseformer if where == "model" else with_dwa.blocks[0].mixer.inner_denseformer
    with torch.no_grad():
        for weights in dwa_module.weights.values():
            weights.zero_()[-1] = 1.0
    tokens = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(with_dwa(tokens), plain(tokens), rtol=0, atol=0)


def test_trained_weights_mix_earlier_depths_and_get_gradients():
    model = small_model(n_layers=3, denseformer={"dilation": 1}).train()
    tokens = torch.randint(0, 61, (2, 20))
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    grads = [w.grad for w in model.denseformer.weights.values()]
    assert [g.shape[0] for g in grads] == [2, 3, 4]
    assert all(g.abs().min() > 0 for g in grads)
    with torch.no_grad():
        before = model(tokens)
        model.denseformer.weights["1"][0] += 0.5  # more of the embeddings after depth 1
        assert not torch.allclose(model(tokens), before)


def test_bad_options_name_the_key():
    with pytest.raises(UserError, match="model.denseformer.period must be positive"):
        config_from_dict({"model": {"denseformer": {"dilation": 1, "period": 0}}})
    with pytest.raises(UserError, match="unknown config key model.denseformer.every"):
        config_from_dict({"model": {"denseformer": {"every": 2}}})
