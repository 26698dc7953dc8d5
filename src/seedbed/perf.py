"""Compute accounting: the machine's measured matmul peak and a model's FLOPs per token.

Model FLOPs follow the PaLM convention: 6 per weight per trained token (forward +
backward) for every matrix that multiplies activations (the tied head included, the
embedding lookup not), plus 12 * layers * width * context for attention scores and
values. Utilisation (MFU) is model FLOPs per second over the measured peak.
"""

from __future__ import annotations

import json
import platform
import time

import torch
from torch import nn

from seedbed.fileio import atomic_write_text


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of square n x n matmuls over several timed rounds."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 4
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return f"{device.type}|{name}|{torch.get_num_threads()}|{torch.__version__}|{dtype}"


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best matmul FLOP/s ever measured for this machine, thread count, torch and dtype.

    A short measurement runs every time and the cache on disk keeps the maximum, so a
    measurement taken while the machine was busy can never inflate a later MFU.
    """
    from seedbed.data import cache_dir

    path = cache_dir() / "matmul_peak.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = machine_key(device, dtype)
    measured = measure_matmul_peak(device, dtype, seconds=0.5)
    if measured > table.get(key, 0.0):
        table[key] = measured
        atomic_write_text(path, json.dumps(table, indent=1))
    return table[key]


def training_flops_per_token(model: nn.Module, context: int) -> float:
    """Counts every linear at the multiply-adds it runs: its full (virtual) size, whether its
    weight is stored or generated, unless it declares ``matmul_macs`` (a factored product)."""
    cfg = model.cfg
    matrix_params = sum(getattr(m, "matmul_macs", m.in_features * m.out_features) for m in model.modules()
                        if hasattr(m, "in_features") and hasattr(m, "out_features"))
    if cfg.tie_embeddings:
        matrix_params += cfg.vocab_size * cfg.d_model  # the tied head reuses the embedding as a matrix
    return 6 * matrix_params + 12 * cfg.n_layers * cfg.d_model * context
