import pytest
import torch

from seedbed.config import TrainConfig
from seedbed.train.optim import Muon, lr_multiplier, newton_schulz


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_flattens_singular_values(shape):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    singular = torch.logspace(-1, 1, min(shape))  # condition number 100
    out = newton_schulz(u @ torch.diag(singular) @ v.T).float()
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands near 1, not exactly on it
    # ... and keeps the singular vectors: out is close to u v^T.
    assert torch.linalg.matrix_norm(out - u @ v.T) / torch.linalg.matrix_norm(u @ v.T) < 0.35


def test_muon_decreases_a_matrix_regression_loss():
    torch.manual_seed(0)
    target = torch.randn(32, 32) / 32**0.5  # spectral norm about 2: reachable in 60 steps of lr <= 0.1
    x = torch.randn(256, 32)
    w = torch.nn.Parameter(torch.zeros(32, 32))
    opt = Muon([w], lr=0.1)
    losses = []
    for step in range(60):
        opt.param_groups[0]["lr"] = 0.1 * (1 - step / 60)
        loss = ((x @ w.T - x @ target.T) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05 * losses[0]


def test_schedules():
    warm = TrainConfig(warmup_steps=10, schedule="warmdown", warmdown_frac=0.5)
    assert lr_multiplier(0.0, 0, warm) == pytest.approx(0.1)
    assert lr_multiplier(0.3, 50, warm) == 1.0
    assert lr_multiplier(0.75, 50, warm) == pytest.approx(0.5)
    assert lr_multiplier(1.0, 100, warm) == pytest.approx(0.0)
    cosine = TrainConfig(warmup_steps=0, schedule="cosine", min_lr_frac=0.1)
    assert lr_multiplier(0.0, 0, cosine) == pytest.approx(1.0)
    assert lr_multiplier(0.5, 5, cosine) == pytest.approx(0.55)
    assert lr_multiplier(1.0, 9, cosine) == pytest.approx(0.1)
