"""Compute accounting: a model's counted FLOPs per token and the peak that MFU divides by.

FLOPs. Only matmul-like work is counted (matrix products and fused attention), 2 FLOPs
per multiply-add; elementwise work (norms, activations, softmax, quantisers, spline
bases) is not, which is also all that ``torch.utils.flop_counter.FlopCounterMode`` sees.
Every registered linear reports ``flops(tokens)``, every mixer and feed-forward
``flops(batch, context)``: the ``Flops`` of one forward call on ``batch`` sequences of
``context`` positions, forward and backward apart, written beside its ``forward``. A
product A @ B costs 2 * rows * inner * cols forward and as much again in backward for
each operand that takes a gradient (``matmul_flops``): 3x in all for a trainable weight
times an activation, 2x for a frozen (seed-generated) one, 1x for work whose result no
loss depends on. So mixtures count their active experts only, factored linears their
factors, attention its scores at the real context (the full T x T, as PaLM's
12 * layers * width * context), and weights formed per call (LoRA's B A) once per call.
``training_flops_per_token`` sums the blocks and the head. Recomputation by
``model.stream_layers`` checkpointing is a memory trade, not model work, and is not counted.

Peak. On CUDA, the datasheet's dense (not sparsity) tensor-core peak for the device and
dtype when the device is in ``RATED_PEAKS``; otherwise, and on CPU, the best FLOP/s of
matmuls large enough to saturate the device, the maximum over runs kept on disk per
machine. ``peak`` returns the number with its source; MFU = model FLOP/s / peak.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from seedbed.fileio import atomic_write_text
from seedbed.hardware import cpu_model


@dataclass(frozen=True)
class Flops:
    """Counted FLOPs of one forward call and of its backward pass."""

    forward: float = 0.0
    backward: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, times: float) -> Flops:
        return Flops(self.forward * times, self.backward * times)

    __rmul__ = __mul__

    @property
    def training(self) -> float:
        return self.forward + self.backward


def matmul_flops(rows: int, inner: int, cols: int, grads: int = 2) -> Flops:
    """(rows x inner) @ (inner x cols): 2 * rows * inner * cols forward, and as much again in
    backward for each of the ``grads`` operands that take a gradient (2: activation times
    trainable weight; 1: one side frozen or constant; 0: the result is never used by the loss)."""
    forward = 2 * rows * inner * cols
    return Flops(forward, grads * forward)


def training_flops_per_token(model: nn.Module, context: int, batch: int = 1) -> float:
    """Forward + backward FLOPs per trained token of a forward call on ``batch`` sequences of
    ``context`` positions: every block's mixer and feed-forward, and the head (the tied
    embedding as a matrix; the embedding lookup costs nothing). ``batch`` matters only for
    weights formed once per call, whose cost is shared by the call's tokens."""
    cfg, tokens = model.cfg, batch * context
    total = sum((layer.flops(batch, context) for layer in model.blocks), Flops())
    head = matmul_flops(tokens, cfg.d_model, cfg.vocab_size) if model.head is None else model.head.flops(tokens)
    return (total + head).training / tokens


# Datasheet dense peaks in TFLOP/s (sparsity figures halved): (bf16/fp16 tensor, tf32 tensor, fp32),
# matched in order against torch.cuda.get_device_name, more specific patterns first.
RATED_PEAKS: list[tuple[str, str, tuple[float, float, float]]] = [
    (r"H100.*PCIe", "NVIDIA H100 PCIe", (756.0, 378.0, 51.2)),
    (r"H100 NVL", "NVIDIA H100 NVL", (835.5, 417.5, 60.0)),
    (r"H100", "NVIDIA H100 SXM", (989.0, 494.5, 67.0)),
    (r"GH200", "NVIDIA GH200", (989.0, 494.5, 67.0)),
    (r"H200 NVL", "NVIDIA H200 NVL", (835.5, 417.5, 60.0)),
    (r"H200", "NVIDIA H200", (989.0, 494.5, 67.0)),
    (r"A100", "NVIDIA A100", (312.0, 156.0, 19.5)),
    (r"\bA10\b", "NVIDIA A10", (125.0, 62.5, 31.2)),
    (r"L40S", "NVIDIA L40S", (362.0, 183.0, 91.6)),
    (r"\bL4\b", "NVIDIA L4", (121.0, 60.0, 30.3)),
    (r"RTX 4090", "NVIDIA GeForce RTX 4090", (165.2, 82.6, 82.6)),
    (r"RTX 3090", "NVIDIA GeForce RTX 3090", (71.0, 35.6, 35.6)),
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # "rated: ..." or "measured: ..."


def rated_peak(device_name: str, dtype: torch.dtype, tf32: bool = False) -> Peak | None:
    """The datasheet dense peak for this GPU and matmul dtype (fp32 runs at the tf32 rate when
    ``tf32`` matmuls are allowed), or None for a GPU or dtype the table does not know."""
    for pattern, label, (half, tf32_rate, fp32) in RATED_PEAKS:
        if re.search(pattern, device_name):
            if dtype in (torch.bfloat16, torch.float16):
                name, tflops = ("bf16" if dtype == torch.bfloat16 else "fp16"), half
            elif dtype == torch.float32:
                name, tflops = ("tf32", tf32_rate) if tf32 else ("fp32", fp32)
            else:
                return None
            return Peak(tflops * 1e12, f"rated: {label} {name} dense {tflops:g} TFLOP/s")
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square n x n matmul, timed one at a time for ``seconds`` (at least once)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() >= deadline:
            return best


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{device.type}|{name}|{torch.get_num_threads()}|{torch.__version__}|{dtype}"


# Matmul sizes that saturate the device: a CPU peaks by 1024-2048, a large GPU needs 8192.
MEASURED_SIZES = {"cpu": (1024, 2048), "cuda": (8192,)}


def measured_peak(device: torch.device, dtype: torch.dtype) -> Peak:
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
    sizes = MEASURED_SIZES.get(device.type, MEASURED_SIZES["cpu"])
    measured = max(measure_matmul_peak(device, dtype, n=n, seconds=0.3) for n in sizes)
    if measured > table.get(key, 0.0):
        table[key] = measured
        atomic_write_text(path, json.dumps(table, indent=1))
    sizes_text = " and ".join(f"{n}^3" for n in sizes)
    return Peak(table[key], f"measured: best {sizes_text} {str(dtype).removeprefix('torch.')} matmul")


def peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The device's peak matmul FLOP/s for ``dtype`` and where it comes from: rated for a known GPU, else measured."""
    if device.type == "cuda":
        rated = rated_peak(torch.cuda.get_device_name(device), dtype,
                           tf32=torch.backends.cuda.matmul.allow_tf32)
        if rated is not None:
            return rated
    return measured_peak(device, dtype)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The FLOP/s that MFU divides by (``peak`` also says where it comes from)."""
    return peak(device, dtype).flops
