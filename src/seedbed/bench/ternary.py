"""Batch-1 timings of the ternary matmul kernels beside dense fp32 (and bf16 where the CPU runs it fast)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from seedbed.hardware import cpu_has_fast_bf16
from seedbed.model.bitlinear import (INT8_MATMUL_ON_CPU, BitLinear, quantise_activations, ternarise,
                                     ternary_matmul_int8, ternary_matmul_reference)


def bench_ternary_matmul(shapes: list[tuple[int, int]], min_run_time: float = 0.5) -> list[dict]:
    """Median microseconds at batch 1 for each (in_features, out_features): dense fp32 and bf16
    matmuls, the float ternary reference, the int8 kernel, and a whole eval-mode BitLinear
    (norm, activation quantisation, int8 matmul, rescale) of the same shape."""
    results = []
    for in_features, out_features in shapes:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, in_features, generator=generator)
        dense = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        layer = BitLinear(in_features, out_features, BitLinear.Options()).eval()
        with torch.no_grad():
            layer.weight.copy_(dense)
        trits, scale = ternarise(dense)
        trits_int8 = trits.to(torch.int8)
        levels, step = quantise_activations(x, 8)
        x_bf16, dense_bf16 = x.bfloat16(), dense.bfloat16()
        candidates = {
            "fp32_dense": lambda: F.linear(x, dense),
            "bf16_dense": lambda: F.linear(x_bf16, dense_bf16),
            "ternary_reference": lambda: ternary_matmul_reference(levels, step, trits, scale),
            "ternary_int8": lambda: ternary_matmul_int8(levels, step, trits_int8, scale),
            "bitlinear_eval": lambda: layer(x),
        }
        if not INT8_MATMUL_ON_CPU:
            del candidates["ternary_int8"]
        if not cpu_has_fast_bf16():  # emulated bf16 would only measure the emulation
            del candidates["bf16_dense"]
        row = {"in_features": in_features, "out_features": out_features, "threads": torch.get_num_threads()}
        with torch.no_grad():
            for name, run in candidates.items():
                timer = benchmark.Timer(stmt="run()", globals={"run": run})
                row[f"{name}_us"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e6
        results.append(row)
    return results
