"""Shared contracts every registered mixer and feed-forward must honour.

A new component joins these tests by registering itself: each test runs over every
name in the registry (with extra option variants listed below where useful).
"""

import pytest
import torch

from seedbed.config import ModelConfig
from seedbed.model import LM
from seedbed.model.attention import fast_attention, reference_attention
from seedbed.registry import FFNS, LINEARS, MIXERS

# Extra option sets worth testing beyond each component's defaults.
MIXER_VARIANTS = {"attention": [{"n_heads": 4, "n_kv_heads": 2}, {"n_heads": 2, "qk_norm": False}],
                  "hourglass": [{"compress": "last", "upsample": "attention", "group": 3, "latents": 2}],
                  "multichannel": [{"channels": 3, "merge": "max", "shared_fraction": 0.5}]}
FFN_VARIANTS = {"mlp": [{"activation": "leaky_relu2", "mult": 3.0}],
                "peer": [{"n_experts": 256, "heads": 2, "top_k": 4, "reference": True}],
                "moe": [{"noop_experts": 2, "n_shared": 0, "n_routed": 4}]}  # integrated MoDE
LINEAR_VARIANTS = {"seeded": [{"keep": 0.5, "factors": "uint8"}]}


def variants(registry, extra):
    return [(name, opts) for name in registry.names() for opts in [{}] + extra.get(name, [])]


def small_model(mixer=None, ffn=None, seed=0, **overrides) -> LM:
    """A 2-layer model whose every parameter is perturbed (generated weights stay as seeded)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": 61, "d_model": 32, "n_layers": 2, "max_seq_len": 48,
                         "mixer": mixer or {"kind": "attention", "n_heads": 4},
                         "ffn": ffn or {"kind": "mlp"}, **overrides})
    model = LM(cfg)
    # Zero-initialised projections would hide bugs: give every weight a random value.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# Non-uniform stacks (model/stack.py): patterns, per-depth overrides, blocks without a mixer or
# a feed-forward, shared parts with per-use adapters, gains and depth embeddings, extra inputs.
ATTENTION = {"kind": "attention", "n_heads": 4}
SHARED_ATTENTION_BLOCK = {"mixer": ATTENTION, "ffn": {"kind": "mlp"}, "share": "block", "lora_rank": 4,
                          "input": "hidden+embedding"}
STACKS = {
    "pattern-retention-then-ffnless-attention": {
        "n_layers": 4, "mixer": {"kind": "retention", "n_heads": 2}, "pattern": ["default", "attn"],
        "blocks": {"attn": {"mixer": ATTENTION, "ffn": {"kind": "none"}}}},
    "shared-ffn-with-gains": {"n_layers": 3, "blocks": {"default": {"share": "ffn", "use_scale": True}}},
    "universal-with-depth-embedding": {"n_layers": 3, "blocks": {"default": {"share": "block", "depth_embedding": True}}},
    "shared-mixer-lora-and-a-mixerless-depth": {
        "n_layers": 3, "depths": {"1": "mlp_only"},
        "blocks": {"default": {"share": "mixer", "lora_rank": 2}, "mlp_only": {"mixer": {"kind": "none"}}}},
    "zamba-like": {"n_layers": 4, "mixer": {"kind": "mamba2"}, "ffn": {"kind": "none"}, "pattern": ["default", "attn"],
                   "blocks": {"attn": SHARED_ATTENTION_BLOCK}},
    # The seed's hourglass, two levels deep: a token layer, compression of groups of 3 into 2 latents by a
    # group encoder, local and global latent layers (a nested stage, multi-channel attention, a latent
    # Mamba-2), Denseformer inside and out, attention upsampling, and a token layer. (Not the latent loss:
    # it is a training loss on later groups, outside the logits these tests read; test_hourglass.py.)
    "hourglass-two-levels": {
        "n_layers": 3, "pattern": ["default", "valley", "default"], "denseformer": {"dilation": 2},
        "blocks": {
            "valley": {"mixer": {"kind": "hourglass", "group": 3, "latents": 2, "compress": "last",
                                 "compress_plan": ["default"], "upsample": "attention",
                                 "inner": ["local", "nested", "channels", "latent_ssm"], "denseformer": {"dilation": 1}},
                       "ffn": {"kind": "none"}},
            "local": {"scope": "local"},
            "nested": {"mixer": {"kind": "hourglass", "group": 2, "inner": ["transformer"]}, "ffn": {"kind": "none"}},
            "channels": {"mixer": {"kind": "multichannel", "channels": 2}, "ffn": {"kind": "none"}},
            "latent_ssm": {"mixer": {"kind": "mamba2"}, "ffn": {"kind": "none"}}}},
    # Mixture of depths (model/depths.py) on an attention block, and staged MoDE (depth routing, then
    # an MoE with a no-op expert) on a Mamba-2 block. Each routed block keeps one state per row. Training here uses the causal decision too (top-k is not
    # causal: TRAIN_CASES below).
    "mixture-of-depths-and-staged-mode": {
        "n_layers": 3, "pattern": ["default", "routed", "staged"],
        "blocks": {"routed": {"mixture_of_depths": {"capacity": 0.5, "train_decision": "causal"}},
                   "staged": {"mixer": {"kind": "mamba2"}, "ffn": {"kind": "moe", "n_routed": 3, "noop_experts": 1},
                              "mixture_of_depths": {"capacity": 0.5, "train_decision": "causal"}}}},
    "hourglass-shared-latent-block": {
        "n_layers": 1, "mixer": {"kind": "hourglass", "inner": ["latent*3"]}, "ffn": {"kind": "none"},
        "blocks": {"latent": {"mixer": ATTENTION, "ffn": {"kind": "mlp"}, "share": "block", "lora_rank": 2}}},
}


def models_under_test():
    for name, spec in STACKS.items():
        yield f"stack-{name}", spec
    for name, opts in variants(MIXERS, MIXER_VARIANTS):
        yield f"mixer-{name}-{opts}", {"mixer": {"kind": name, **opts}}
    for name, opts in variants(FFNS, FFN_VARIANTS):
        yield f"ffn-{name}-{opts}", {"ffn": {"kind": name, **opts}}
    for name, opts in variants(LINEARS, LINEAR_VARIANTS):
        yield f"linear-{name}-{opts}", {"linear": {"kind": name, **opts}}


CASES = list(models_under_test())


@pytest.mark.parametrize("spec", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_causal(spec):
    """Changing token t changes no logits before t, and does change logits at t."""
    model = small_model(**spec)
    tokens = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 17, 39):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 7) % 61
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"position {t} leaked into the past"
            assert not torch.allclose(out[:, t], base[:, t]), "the changed token had no effect"


@pytest.mark.parametrize("spec", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_step_by_step_equals_parallel(spec):
    model = small_model(**spec)
    tokens = torch.randint(0, 61, (3, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        state = model.init_state(3, 48)
        steps = []
        for t in range(48):
            logits, state = model.step(tokens[:, t:t + 1], state)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
        # A chunked prefill followed by single steps gives the same answer too.
        state = model.init_state(3, 48)
        head, state = model.step(tokens[:, :29], state)
        tail = [model.step(tokens[:, t:t + 1], state)[0] for t in range(29, 48)]
        torch.testing.assert_close(torch.cat([head] + tail, 1), full, rtol=1e-4, atol=1e-4)



def decode_three_ways(mixer, x: torch.Tensor, prefills: list[int]):
    """A mixer's parallel output on x (B, T, d); its output stepped one position at a time; its output
    from prefills ending at each of ``prefills`` and then single steps; and the two decode states."""
    batch, length = x.shape[:2]
    with torch.no_grad():
        full = mixer(x)
        single = mixer.init_state(batch, length, x.device, x.dtype)
        singles = [mixer.step(x[:, t:t + 1], single)[0] for t in range(length)]
        chunked = mixer.init_state(batch, length, x.device, x.dtype)
        starts = [0] + prefills
        parts = [mixer.step(x[:, a:b], chunked)[0] for a, b in zip(starts, prefills)]
        parts += [mixer.step(x[:, t:t + 1], chunked)[0] for t in range(starts[-1], length)]
    return full, torch.cat(singles, 1), torch.cat(parts, 1), single, chunked


# Training mode: every case above, plus training-only behaviour worth its own case.
CAPACITY_LEAK = pytest.mark.xfail(strict=True, reason=(
    "causality leak, MoE capacity_factor > 0 (training only): each expert keeps the first "
    "ceil(c * B * T * top_k / n_routed) assignments ranked by (choice j, flattened index b * T + t), so "
    "every token's first choice outranks every earlier token's second choice (later tokens of the same "
    "sequence evict earlier ones: logits before t move by ~0.06-0.7 here), and row b ranks after all of "
    "row b - 1; documented in moe.py, off by default and in eval"))
TOPK_LEAK = pytest.mark.xfail(strict=True, reason=(
    "causality leak, mixture of depths with train_decision = 'topk' (the paper's, and the default): "
    "training runs a routed block on the top ceil(capacity * T) router logits of each row, so whether an "
    "early token runs the block depends on later tokens' logits; documented in depths.py. Evaluation, "
    "generation and compression use the causal decision only (the eval-mode tests above)"))
TRAIN_CASES = [(name, spec, ()) for name, spec in CASES] + [
    ("stack-mixture-of-depths-topk", {"n_layers": 2, "pattern": ["routed", "default"],
                                      "blocks": {"routed": {"mixture_of_depths": {"capacity": 0.5}}}}, (TOPK_LEAK,)),
    ("ffn-moe-capacity", {"ffn": {"kind": "moe", "capacity_factor": 1.0}}, (CAPACITY_LEAK,)),
    ("ffn-moe-reference", {"ffn": {"kind": "moe", "reference": True}}, ()),
    ("ffn-moe-top1-kan-experts", {"ffn": {"kind": "moe", "top_k": 1, "n_routed": 4, "expert": "kan"}}, ()),
    ("mixer-retention-chunk5", {"mixer": {"kind": "retention", "chunk_size": 5}}, ()),
    ("linear-bitlinear-float-activations", {"linear": {"kind": "bitlinear", "activation_bits": 0}}, ()),
    ("linear-seeded-factored", {"linear": {"kind": "seeded", "fine_scale": 0.0, "fine_shift": 0.0,
                                           "sign_mask": False}}, ()),
    ("linear-seeded-streamed", {"linear": {"kind": "seeded"}, "stream_layers": True}, ()),
    # Checkpointing re-runs each layer in backward: the shared block's adapters must follow the use.
    ("stack-zamba-like-streamed", {**STACKS["zamba-like"], "stream_layers": True}, ()),
]
TRAIN_PARAMS = [pytest.param(spec, id=name, marks=marks) for name, spec, marks in TRAIN_CASES]


def training_forward(model, tokens, t, weights):
    """Training-mode logits and the parameter gradients of a loss that reads only positions < t."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    (logits[:, :t] * weights[:, :t]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("spec", TRAIN_PARAMS)
def test_causal_in_training_mode(spec):
    """model.train(), gradients on: changing every token from t on changes neither the logits
    before t nor the gradient of a loss on them (straight-through estimators, routing, custom
    backward passes and checkpointing included), and does change the logits at t."""
    model = small_model(**spec).train()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 61, (2, 24), generator=g)
    weights = torch.randn(2, 24, 61, generator=g)
    for t in (7, 18):
        base, base_grads = training_forward(model, tokens, t, weights)
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + torch.randint(1, 61, changed[:, t:].shape, generator=g)) % 61
        out, grads = training_forward(model, changed, t, weights)
        # Not bit-exact: the batched MoE dispatch regroups tokens by expert, so matmul rounding
        # moves by an ulp (~2e-7) when later tokens route elsewhere; a leak moves logits by far more.
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"positions >= {t} leaked into the past in training mode\n{m}")
        assert not torch.allclose(out[:, t], base[:, t]), "the changed token had no effect"
        assert grads.keys() == base_grads.keys() and len(grads) == len(list(model.parameters()))
        # A gradient that is zero in exact arithmetic (attention over a single picked key has
        # dq = dk = 0) holds the rounding noise of terms on the model's gradient scale that cancel.
        noise_floor = 1e-6 * max(g.abs().max().item() for g in base_grads.values())
        for name, grad in grads.items():
            # Relative to the tensor's largest gradient: the batched MoE dispatch's regrouping moves
            # sums by up to ~2e-6 of that (KAN experts), while its per-token reference is bit-exact.
            scale = base_grads[name].abs().max().item()
            leaked = f"{name}: gradient of a loss before {t} depends on later tokens"
            torch.testing.assert_close(grad, base_grads[name], rtol=0, atol=1e-5 * scale + noise_floor,
                                       msg=lambda m: f"{leaked}\n{m}")


@pytest.mark.parametrize("spec", TRAIN_PARAMS)
def test_step_by_step_equals_parallel_in_training_mode(spec):
    """Incremental decoding in training mode (straight-through BitLinear, MoE with its training
    routing) gives the parallel training-mode logits."""
    model = small_model(**spec).train()
    tokens = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(5))
    full = model(tokens)
    state = model.init_state(3, 20)
    head, state = model.step(tokens[:, :11], state)
    tail = [model.step(tokens[:, t:t + 1], state)[0] for t in range(11, 20)]
    stepped = torch.cat([head] + tail, 1)
    assert stepped.requires_grad
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_fast_attention_matches_reference():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(fast_attention(q, k, v, 0), reference_attention(q, k, v, 0), rtol=1e-5, atol=1e-5)
    # With a cache: 5 new queries at positions 15..19 over 20 keys.
    torch.testing.assert_close(fast_attention(q[:, :, 15:], k, v, 15), reference_attention(q[:, :, 15:], k, v, 15),
                               rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_shares_each_kv_head_across_its_group():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 20, 8, generator=g)
    k, v = (torch.randn(2, 2, 20, 8, generator=g) for _ in range(2))
    # Query heads 0-2 read key/value head 0, heads 3-5 head 1: the same as explicit copies.
    copied = [x.repeat_interleave(3, dim=1) for x in (k, v)]
    expected = reference_attention(q, *copied, 0)
    torch.testing.assert_close(reference_attention(q, k, v, 0), expected)
    torch.testing.assert_close(fast_attention(q, k, v, 0), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_attention(q[:, :, 15:], k, v, 15), expected[:, :, 15:], rtol=1e-5, atol=1e-5)


def test_reference_attention_model_matches_fast_model():
    fast = small_model(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2})
    ref = small_model(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "reference": True})
    ref.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 61, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), ref(tokens), rtol=1e-4, atol=1e-4)


def test_logit_softcap_bounds_logits():
    model = small_model(logit_softcap=2.0)
    with torch.no_grad():
        logits = model(torch.randint(0, 61, (1, 16)))
    assert logits.abs().max() <= 2.0


def test_untied_head_and_log_probs_are_normalised():
    model = small_model(tie_embeddings=False)
    with torch.no_grad():
        log_probs = model.log_probs(torch.randint(0, 61, (2, 16)))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 16), rtol=0, atol=1e-5)
    assert "head.weight" in dict(model.named_parameters())


def test_gqa_has_fewer_kv_parameters():
    full = small_model(mixer={"kind": "attention", "n_heads": 4})
    grouped = small_model(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 1})
    assert grouped.blocks[0].mixer.k.weight.shape == (8, 32)
    assert full.blocks[0].mixer.k.weight.shape == (32, 32)


def test_output_projections_start_at_zero():
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=61, d_model=32, n_layers=2))
    for block in model.blocks:
        assert block.mixer.out.weight.abs().max() == 0
        assert block.ffn.down.weight.abs().max() == 0


def test_generate_is_deterministic_with_seed_and_respects_top_k():
    model = small_model()
    run = lambda seed: list(model.generate([1, 2, 3], 60, temperature=1.0, top_k=1,
                                           generator=torch.Generator().manual_seed(seed)))
    assert run(0) == run(1), "top-k 1 is greedy, whatever the seed"
    sampled = lambda seed: list(model.generate([1, 2, 3], 60, temperature=1.5,
                                               generator=torch.Generator().manual_seed(seed)))
    assert sampled(5) == sampled(5)
    assert len(sampled(5)) == 60  # past max_seq_len=48: the context window slides


def test_greedy_generation_matches_parallel_argmax():
    model = small_model()
    prompt = [5, 9, 11]
    out = list(model.generate(prompt, 10, temperature=0))
    seq = prompt + out
    with torch.no_grad():
        logits = model(torch.tensor([seq]))
    expected = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == expected
