"""Batch-1 timings of the ternary matmul kernels beside dense fp32 (and bf16 where the CPU runs it fast)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from seedbed.hardware import cpu_has_fast_bf16
from seedbed.model.bitlinear import (INT8_MATMUL_ON_CPU, BitLinear, quantise_activations, ternarise,
                                     ternary_matmul_int8, ternary_matmul_reference)
from seedbed.model.packed_ternary import load_kernel, pack_trits, packed_ternary_linear


def bench_ternary_matmul(shapes: list[tuple[int, int]], min_run_time: float = 0.5) -> list[dict]:
    """Median microseconds at batch 1 for each (in_features, out_features): dense fp32 and bf16
    matmuls; the float ternary reference and the int8 kernel (matmul alone, levels given); the whole
    layer (norm, activation quantisation, matmul, rescale) through the int8 kernel and through the
    packed 2-bit kernel; and an eval-mode BitLinear module (which runs the packed kernel where it loads)."""
    results = []
    kernel = load_kernel()
    for in_features, out_features in shapes:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, in_features, generator=generator)
        dense = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        layer = BitLinear(in_features, out_features, BitLinear.Options()).eval()
        with torch.no_grad():
            layer.weight.copy_(dense)
        trits, scale = ternarise(dense)
        trits_int8, codes = trits.to(torch.int8), pack_trits(trits)
        levels, step = quantise_activations(x, 8)
        x_bf16, dense_bf16 = x.bfloat16(), dense.bfloat16()

        def int8_layer():
            return ternary_matmul_int8(*layer.quantised_input(x), trits_int8, scale)

        candidates = {
            "fp32_dense": lambda: F.linear(x, dense),
            "bf16_dense": lambda: F.linear(x_bf16, dense_bf16),
            "ternary_reference": lambda: ternary_matmul_reference(levels, step, trits, scale),
            "ternary_int8": lambda: ternary_matmul_int8(levels, step, trits_int8, scale),
            "int8_layer": int8_layer,
            "packed_layer": lambda: packed_ternary_linear(x, codes, in_features, float(scale), 8, True),
            "bitlinear_eval": lambda: layer(x),
        }
        if not INT8_MATMUL_ON_CPU:
            del candidates["ternary_int8"], candidates["int8_layer"]
        if kernel is None:
            del candidates["packed_layer"]
        if not cpu_has_fast_bf16():  # emulated bf16 would only measure the emulation
            del candidates["bf16_dense"]
        row = {"in_features": in_features, "out_features": out_features, "threads": torch.get_num_threads(),
               "weight_bytes": {"fp32": 4 * dense.numel(), "int8": trits_int8.numel(), "packed": codes.numel()}}
        with torch.no_grad():
            for name, run in candidates.items():
                timer = benchmark.Timer(stmt="run()", globals={"run": run})
                row[f"{name}_us"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e6
        results.append(row)
    return results
