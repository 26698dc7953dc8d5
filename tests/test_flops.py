"""Counted FLOPs and the MFU peak.

``training_flops_per_token`` must match what ``FlopCounterMode`` counts in one real
forward + backward, within 10%, for every registered mixer and feed-forward (a new
component joins by registering itself) and every linear kind. Both sides count
matmul-like work only: FlopCounterMode sees matrix products and fused attention, not
elementwise ops, and the components' ``flops`` leave elementwise work out too.
CPU attention runs torch's CPU flash kernel, which FlopCounterMode has no formula for,
so it is given torch's own SDPA formulas. Routing is per token and fixed (top-k, modulo),
so the count needs no knowledge of which experts were picked.
"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from seedbed.config import ModelConfig
from seedbed.model import LM, moe
from seedbed.perf import RATED_PEAKS, peak, rated_peak, training_flops_per_token
from seedbed.registry import FFNS, LINEARS, MIXERS

BATCH, CONTEXT = 2, 32
CPU_SDPA = {  # FlopCounterMode passes shapes: torch's own formulas for the CUDA kernels
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}

MIXER_VARIANTS = {
    "attention": [{"reference": True}, {"n_kv_heads": 2}],
    "hourglass": [{"compress": "last", "upsample": "attention", "latents": 2}, {"latent_loss": 0.5, "group": 3}],
    "retention": [{"form": "parallel"}, {"form": "recurrent"}, {"chunk_size": 12, "value_factor": 2.0}],
}
FFN_VARIANTS = {
    "kan": [{"basis": "rbf"}, {"down": "linear"}],
    "moe": [{"expert": "kan", "n_routed": 4}, {"n_shared": 0, "top_k": 1, "n_routed": 4}],
    "modulo-experts": [{"generalist_mult": 0.0, "rank_mixer": False}],
}
FACTORED_SEEDED = {"kind": "seeded", "fine_scale": 0.0, "fine_shift": 0.0, "sign_mask": False}


@pytest.fixture(autouse=True)
def one_thread():
    """The matmuls here are tiny: one thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variants(registry, extra):
    return [(name, opts) for name in registry.names() for opts in [{}] + extra.get(name, [])]


def cases():
    """(mixer, ffn, linear, tie_embeddings): every mixer and ffn variant on dense linears,
    every linear kind on the MLP, and per-call weights (LoRA) inside a mixture."""
    attention, mlp, dense = {"kind": "attention"}, {"kind": "mlp"}, {"kind": "dense"}
    found = [({"kind": name, **opts}, mlp, dense, True) for name, opts in variants(MIXERS, MIXER_VARIANTS)]
    found += [(attention, {"kind": name, **opts}, dense, True) for name, opts in variants(FFNS, FFN_VARIANTS)]
    found += [(attention, mlp, {"kind": name}, True) for name in LINEARS.names() if name != "dense"]
    found += [(attention, mlp, FACTORED_SEEDED, True), (attention, mlp, dense, False),
              (attention, {"kind": "moe", "n_routed": 4}, {"kind": "orthogonal-lora", "rank": 8}, True),
              (attention, {"kind": "modulo-experts"}, {"kind": "seeded"}, True)]
    return [case for i, case in enumerate(found) if case not in found[:i]]  # attention + mlp appears twice


def counted_training_flops(model: LM, tokens: torch.Tensor) -> int:
    """FlopCounterMode's count of one training forward + backward (generated weights built beforehand,
    as they are after the first step)."""
    with torch.no_grad():
        model.loss(tokens[:, :-1], tokens[:, 1:])
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mixer,ffn,linear,tie", cases(),
                         ids=lambda v: v.get("kind", "") + "".join(f",{k}={x}" for k, x in v.items() if k != "kind")
                         if isinstance(v, dict) else f"tie={v}")
def test_training_flops_match_the_counted_flops(mixer, ffn, linear, tie, monkeypatch):
    monkeypatch.setattr(moe, "ROW_BUCKET", 1)  # the estimate counts the tokens' work, not the zero padding
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, max_seq_len=CONTEXT, mixer=mixer, ffn=ffn,
                      linear=linear, tie_embeddings=tie)
    model = LM(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, CONTEXT + 1))
    counted = counted_training_flops(model, tokens)
    estimated = training_flops_per_token(model, CONTEXT, BATCH) * BATCH * CONTEXT
    assert estimated == pytest.approx(counted, rel=0.10)


def test_attention_scores_follow_the_palm_convention():
    """Read back from the attention module: 12 * layers * d * context per token, at the reference path."""
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=3, max_seq_len=CONTEXT,
                      mixer={"kind": "attention", "reference": True})
    model = LM(cfg)
    longer = training_flops_per_token(model, 2 * CONTEXT) - training_flops_per_token(model, CONTEXT)
    assert longer == 12 * 3 * 64 * CONTEXT


def test_moe_counts_only_the_active_experts():
    """One token through experts of width d: the router, and 2 * 2 * d^2 per active expert, whatever n_routed."""
    d = 64

    def moe_flops(n_routed: int, top_k: int) -> float:
        cfg = ModelConfig(vocab_size=97, d_model=d, n_layers=1, max_seq_len=CONTEXT,
                          ffn={"kind": "moe", "n_shared": 0, "expert_mult": 1.0, "n_routed": n_routed, "top_k": top_k})
        return LM(cfg).blocks[0].ffn.flops(1, 1).training

    assert moe_flops(8, 2) == 3 * (2 * d * 8 + 2 * (2 * 2 * d * d))
    assert moe_flops(16, 2) - moe_flops(8, 2) == 3 * 2 * d * 8  # only the router grows


def test_rated_peaks():
    h200 = rated_peak("NVIDIA H200", torch.bfloat16)
    assert h200.flops == 989e12
    assert h200.source == "rated: NVIDIA H200 bf16 dense 989 TFLOP/s"
    assert rated_peak("NVIDIA H100 80GB HBM3", torch.bfloat16).flops == 989e12
    assert rated_peak("NVIDIA H100 PCIe", torch.bfloat16).flops == 756e12
    assert rated_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True).source == "rated: NVIDIA A100 tf32 dense 156 TFLOP/s"
    assert rated_peak("NVIDIA A100-SXM4-80GB", torch.float32).flops == 19.5e12
    assert rated_peak("NVIDIA L40S", torch.bfloat16).source.startswith("rated: NVIDIA L40S ")
    assert rated_peak("NVIDIA L4", torch.bfloat16).flops == 121e12
    assert rated_peak("NVIDIA GeForce RTX 4090", torch.bfloat16).flops == 165.2e12
    assert rated_peak("Some Future GPU", torch.bfloat16) is None
    assert rated_peak("NVIDIA H200", torch.float64) is None
    for _, label, (half, tf32, fp32) in RATED_PEAKS:
        assert half >= tf32 >= fp32 > 0, label


def test_cpu_peak_is_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDBED_CACHE", str(tmp_path))
    result = peak(torch.device("cpu"), torch.float32)
    assert result.source == "measured: best 1024^3 and 2048^3 float32 matmul"
    assert result.flops > 0
    assert list(json.loads((tmp_path / "matmul_peak.json").read_text()).values()) == [result.flops]


def test_short_training_run_reports_mfu_below_one(small_corpus, tmp_path):
    from seedbed.config import resolve_config
    from seedbed.train.trainer import Trainer

    cfg = resolve_config("gpt", overrides=[
        "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32", "model.mixer.n_heads=2",
        "train.batch_size=4", "train.eval_tokens=2000", "train.log_every=2", "train.warmup_steps=2",
        "train.dtype=fp32", "train.threads=1", "train.steps=6", "train.device=cpu", f'data.spec="{small_corpus}"'])
    result = Trainer(cfg, tmp_path / "run", progress=False).run()
    assert 0 < result.mfu < 1
