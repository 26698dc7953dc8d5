"""What this machine runs fast: the CPU's model and flags, and the dtype to compute in.

bf16 is only fast where the hardware multiplies it natively: CUDA devices that support
it, and CPUs with AVX-512 BF16 or AMX tiles. Elsewhere (an AVX2-only EPYC, say) torch
emulates bf16 matmuls through fp32 conversions and runs them about 10x slower than fp32,
so every choice of compute dtype in seedbed (autocast, Muon's Newton-Schulz, benchmarks)
goes through ``fast_bf16``. ``SEEDBED_CPU_FLAGS`` overrides the flags read from
/proc/cpuinfo, so tests can pose as either kind of CPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    override = os.environ.get("SEEDBED_CPU_FLAGS")
    if override is not None:
        return set(override.replace(",", " ").split())
    return set(_cpuinfo().get("flags", "").split())


def cpu_has_fast_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (and so faster than fp32) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def fast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is native, fp32 elsewhere."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def describe_machine(device: torch.device | None = None) -> str:
    """One line for benchmark tables: the CPU model, its relevant flags, threads, torch, and any GPU."""
    flags = cpu_flags()
    shown = [flag for flag in REPORTED_FLAGS if flag in flags]
    threads = torch.get_num_threads()
    line = (f"{cpu_model()} (flags: {' '.join(shown) or 'none of ' + ' '.join(REPORTED_FLAGS)}; "
            f"fast bf16: {'yes' if cpu_has_fast_bf16() else 'no'}), {threads} thread{'' if threads == 1 else 's'}, "
            f"torch {torch.__version__}")
    if device is not None and device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@cache
def return_large_frees_to_the_system(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation above ``threshold`` bytes by mmap, for the rest of the process.

    glibc raises its mmap threshold as large blocks are freed, after which regenerated
    weights come from the heap, and the heap's high-water mark grows with every layer
    though nothing stays alive. A fixed threshold (which also stops that adjustment) hands
    each freed block back at once, so layer streaming's memory follows what is alive.
    Returns False where the C library has no ``mallopt`` (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
