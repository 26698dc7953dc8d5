"""Modulo-gated experts: routing by token id, batched dispatch equal to a per-token loop."""

import torch

from seedbed.model.layers import BuildContext
from seedbed.model.modulo_experts import ModuloExperts

CTX = BuildContext(d_model=16, n_layers=1, layer_index=0, max_seq_len=32,
                   linear_spec={"kind": "dense"}, norm_spec={"kind": "rmsnorm"})


def layer(**options) -> ModuloExperts:
    torch.manual_seed(0)
    ffn = ModuloExperts(ModuloExperts.Options(**options), CTX)
    with torch.no_grad():
        for p in ffn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ffn


def per_token_reference(ffn: ModuloExperts, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The equation of the module docstring, one token at a time."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        parts = []
        for experts, n in zip(ffn.experts, ffn.splits):
            e, r = int(tokens[i]) % n, experts.rank
            table = experts.generated(experts.build)
            v = table[: n * r].view(n, r, -1)[e]
            parts.append(experts.rank_scalars[e] * (v @ x[i]))
        z = torch.cat(parts)
        if ffn.mix_p is not None:
            z = z + (ffn.mix_p @ z) * (ffn.mix_q @ z)
        start = 0
        for experts, n in zip(ffn.experts, ffn.splits):
            e, r = int(tokens[i]) % n, experts.rank
            u = experts.generated(experts.build)[n * r:].view(n, r, -1)[e]
            out[i] += z[start:start + r] @ u
            start += r
    return out


def test_batched_dispatch_equals_per_token_loop():
    ffn = layer(splits=[2, 3, 5], ranks=[2, 3, 4], generalist_mult=0)
    x = torch.randn(40, 16)
    tokens = torch.randint(0, 256, (40,))
    with torch.no_grad():
        torch.testing.assert_close(ffn(x[None], tokens[None])[0], per_token_reference(ffn, x, tokens),
                                   rtol=1e-5, atol=1e-5)


def test_routing_picks_expert_token_mod_n():
    ffn = layer(splits=[3], ranks=[4], generalist_mult=0, rank_mixer=False)
    with torch.no_grad():
        ffn.experts[0].rank_scalars.copy_(torch.tensor([0.0, 1.0, 0.0]))  # only expert 1 is on
        tokens = torch.arange(30)
        out = ffn(torch.randn(1, 30, 16), tokens[None])[0]
    active = out.abs().sum(-1) > 0
    assert torch.equal(active, tokens % 3 == 1)


def test_starts_as_the_generalist_and_experts_cost_only_seeds():
    torch.manual_seed(0)
    ffn = ModuloExperts(ModuloExperts.Options(), CTX)
    x, tokens = torch.randn(1, 8, 16), torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ffn(x, tokens), ffn.generalist(x, tokens))
    stored = {name: p.numel() for name, p in ffn.named_parameters() if name.startswith("experts")}
    assert sum(stored.values()) == 2 + 3 + 5 + 7  # one learnable rank scalar per expert
    assert all(experts.seeds.numel() == 2 for experts in ffn.experts)
