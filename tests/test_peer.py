"""PEER feed-forward: product-key retrieval == brute force over all N experts, the output formula
by hand, counted FLOPs and active parameters, config errors, and a model that trains."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from seedbed.config import ModelConfig, TrainConfig, resolve_config
from seedbed.errors import UserError
from seedbed.model import LM
from seedbed.model.layers import BuildContext
from seedbed.model.peer import PEER
from seedbed.registry import FFNS
from seedbed.train.optim import build_optimizers, is_hidden_matrix

D = 16


def layer(seed: int = 0, d_model: int = D, **options) -> PEER:
    """A layer whose every weight is perturbed, so the zero-initialised up vectors matter."""
    torch.manual_seed(seed)
    ctx = BuildContext(d_model=d_model, n_layers=1, layer_index=0, max_seq_len=64,
                       linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})
    ffn = PEER(FFNS.options({"kind": "peer", **options}, "model.ffn")[1], ctx)
    with torch.no_grad():
        for p in ffn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ffn


def retrieved(ffn: PEER, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (M, H, k) scores and expert indices of the layer's own search."""
    scores = ffn.sub_key_scores(x.reshape(-1, x.shape[-1]))
    return ffn.retrieve_all(scores) if ffn.reference else ffn.retrieve(scores)


@pytest.mark.parametrize("options", [{"n_experts": 64, "heads": 2, "top_k": 4},
                                     {"n_experts": 64, "heads": 3, "top_k": 8, "key_dim": 6, "query_norm": False},
                                     {"n_experts": 256, "heads": 1, "top_k": 2, "activation": "relu2"}])
def test_product_key_retrieval_equals_brute_force_over_all_experts(options):
    fast, ref = layer(**options), layer(**options, reference=True)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(1))
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (fast_scores, fast_experts), (ref_scores, ref_experts) = retrieved(fast, x), retrieved(ref, x)
    assert fast_experts.shape == ref_experts.shape == (33, fast.heads, fast.top_k)
    assert [set(row) for row in fast_experts.flatten(0, 1).tolist()] == \
           [set(row) for row in ref_experts.flatten(0, 1).tolist()]
    torch.testing.assert_close(fast_scores, ref_scores, rtol=0, atol=1e-6)
    # The chosen experts are the best of all N: the k-th retrieved score beats every other expert.
    n = fast.n
    every = ref.sub_key_scores(x.reshape(-1, D)).detach()
    full = (every[:, :, 0, :, None] + every[:, :, 1, None, :]).flatten(2)  # (M, H, N): i = a n + b
    assert full.shape[-1] == n * n
    assert torch.equal(full.gather(-1, fast_experts), fast_scores)
    kth = fast_scores[..., -1:]
    outside = full.scatter(-1, fast_experts, float("-inf"))
    assert (outside <= kth).all()

    results = []
    for ffn in (fast, ref):
        xi = x.clone().requires_grad_()
        out = ffn(xi, torch.zeros(3, 11, dtype=torch.long))
        (out * cotangent).sum().backward()
        results.append((out, xi.grad, {name: p.grad for name, p in ffn.named_parameters()}))
    (out_f, dx_f, grads_f), (out_r, dx_r, grads_r) = results
    assert out_f.abs().max() > 0.1
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx_f, dx_r, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_r.keys() == {"query.weight", "sub_key_embedding", "down_embedding", "up_embedding"}
    for name in grads_f:
        assert grads_f[name].abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-5, atol=1e-6, msg=name)


def test_output_is_the_explicit_formula_for_one_token():
    """n = 3 (9 experts), 2 heads of 2 experts, key_dim 4: every score, top-k, softmax and neuron by hand."""
    ffn = layer(d_model=4, n_experts=9, heads=2, top_k=2, key_dim=4).double()
    x = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out = ffn(x.view(1, 1, 4), torch.zeros(1, 1, dtype=torch.long)).view(4).tolist()
    xs = x.tolist()
    W = ffn.query.weight.tolist()  # (H * key_dim, d)
    K = ffn.sub_key_embedding.tolist()  # [head][half][a][j]
    U, V = ffn.down_embedding.tolist(), ffn.up_embedding.tolist()
    eps = torch.finfo(torch.float64).eps
    gelu = lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2)))
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    expected = [0.0] * 4
    for h in range(2):
        q = [dot(W[h * 4 + j], xs) for j in range(4)]
        halves = []
        for half in (q[:2], q[2:]):
            rms = math.sqrt(sum(v * v for v in half) / 2 + eps)
            halves.append([v / rms for v in half])
        scores = {}
        for a in range(3):
            for b in range(3):
                scores[a * 3 + b] = dot(halves[0], K[h][0][a]) + dot(halves[1], K[h][1][b])
        best = sorted(scores, key=scores.get, reverse=True)[:2]
        total = sum(math.exp(scores[i]) for i in best)
        for i in best:
            gate = math.exp(scores[i]) / total
            neuron = gelu(dot(U[i], xs))
            for c in range(4):
                expected[c] += gate * neuron * V[i][c]
    assert out == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_flops_are_counted_by_hand_and_match_the_flop_counter():
    d, n, heads, k, key_dim, batch, context = 32, 16, 2, 4, 8, 3, 5
    ffn = layer(d_model=d, n_experts=n * n, heads=heads, top_k=k, key_dim=key_dim)
    tokens = batch * context
    query = 2 * tokens * d * heads * key_dim
    sub_keys = 2 * tokens * heads * 2 * (key_dim // 2) * n
    experts = 2 * tokens * (d * heads * k + heads * k * d)  # u_i . x, then sum of g act v_i
    flops = ffn.flops(batch, context)
    assert flops.forward == query + sub_keys + experts
    assert flops.backward == 2 * flops.forward  # activations and weights take gradients
    # The experts' share is 6 FLOPs per active expert parameter per token: 2 d per retrieved expert.
    assert 3 * experts / tokens == 6 * heads * k * 2 * d
    assert ffn.active_parameters() == heads * k * 2 * d + d * heads * key_dim + heads * n * key_dim
    # Sixteen times the experts (n x 4) costs only the larger sub-key scores.
    bigger = layer(d_model=d, n_experts=(4 * n) ** 2, heads=heads, top_k=k, key_dim=key_dim)
    assert bigger.flops(batch, context).forward - flops.forward == 3 * sub_keys
    assert bigger.active_parameters() - ffn.active_parameters() == 3 * heads * n * key_dim

    x = torch.randn(batch, context, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ffn(x, torch.zeros(batch, context, dtype=torch.long)).square().sum().backward()
    assert counter.get_total_flops() == flops.training


@pytest.mark.parametrize("options,message", [
    ({"n_experts": 1000}, r"^model.ffn.n_experts must be a perfect square \(n\^2 experts\), got 1000$"),
    ({"n_experts": 64, "top_k": 9}, r"^model.ffn.top_k must be between 1 and sqrt\(n_experts\)=8, got 9$"),
    ({"key_dim": 7}, r"^model.ffn.key_dim must be even and >= 2 \(two halves\), got 7$"),
    ({"heads": 0}, r"^model.ffn.heads must be >= 1, got 0$"),
    ({"activation": "tanh"}, r"^model.ffn.activation must be one of .*, got 'tanh'$"),
])
def test_bad_options_are_one_line_errors_naming_the_key(options, message):
    spec = ", ".join(f"{key}={value!r}".replace("'", '"') for key, value in options.items())
    cfg = resolve_config("gpt", overrides=[f'model.ffn={{kind="peer", {spec}}}'])
    with pytest.raises(UserError, match=message):
        LM(cfg.model)


def test_peer_tables_train_with_adamw_and_the_query_with_muon():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=1, max_seq_len=16, ffn={"kind": "peer", "n_experts": 64})
    model = LM(cfg)
    names = {name for name, p in model.named_parameters() if is_hidden_matrix(name, p)}
    assert "blocks.0.ffn.query.weight" in names
    assert not names & {"blocks.0.ffn.down_embedding", "blocks.0.ffn.up_embedding", "blocks.0.ffn.sub_key_embedding"}
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon"))
    table = model.blocks[0].ffn.down_embedding
    assert any(p is table for group in adamw.param_groups for p in group["params"])
    assert not any(p is table for group in muon.param_groups for p in group["params"])


def test_a_model_with_peer_feed_forwards_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, max_seq_len=16,
                      ffn={"kind": "peer", "n_experts": 256, "heads": 2, "top_k": 4})
    model = LM(cfg).train()
    tokens = torch.randint(0, 61, (8, 17), generator=torch.Generator().manual_seed(1))
    (optimizer,) = build_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.0))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if ".ffn." in name}
    losses = []
    for _ in range(20):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p, before[name]), f"{name} did not train"
    # The up vectors start at zero: the layers now write to the residual.
    assert all(block.ffn.up_embedding.abs().max() > 0 for block in model.blocks)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor_of_a_training_step(ffn: PEER, tokens: int) -> int:
    x = torch.randn(1, tokens, ffn.down_embedding.shape[1], requires_grad=True)
    with LargestTensor() as probe:
        ffn(x, torch.zeros(1, tokens, dtype=torch.long)).sum().backward()
    return probe.numel


def test_no_tensor_of_tokens_times_experts_at_65536_experts():
    """N = 65,536, d = 128, 4 heads, k = 8, 4,096 tokens: the largest tensor of a forward + backward is
    the gathered rows (tokens x H k x d = 16.8M elements), 16 times below tokens x N (268M)."""
    tokens, n_experts, d = 4096, 65536, 128
    ffn = layer(d_model=d, n_experts=n_experts, heads=4, top_k=8)
    assert largest_tensor_of_a_training_step(ffn, tokens) == tokens * 4 * 8 * d
    # The probe sees the reference's (tokens x H x N) scores.
    small = layer(n_experts=1024, heads=2, top_k=4, reference=True)
    assert largest_tensor_of_a_training_step(small, 64) == 64 * 2 * 1024
