"""Ternary weights packed 2 bits each in memory, and a CPU kernel that runs a BitLinear on them.

The format. A trit t in {-1, 0, 1} is stored as the code c = t + 1 in two bits. Each row of the
(out, in) trit matrix is padded with zeros to a multiple of 128 and cut into blocks of 128
weights, 32 bytes each: byte j of a block holds weights j, j + 32, j + 64 and j + 96 in its bit
pairs 0-1, 2-3, 4-5 and 6-7 (bitnet.cpp's I2_S layout), so the kernel turns one 32-byte load into
four vectors of 32 consecutive codes with three shifts and four masks. 0.25 bytes a weight, against
1 for the int8 trits and 4 for float32. (The artifact stores trits denser still, 5 to a byte in
base 3; that form costs divisions to unpack, so it is converted once, at load.)

The kernel (``ternary_kernel.c``, compiled with the machine's C compiler on first use and cached)
computes the whole inference BitLinear in one call: per token the absmax levels
L = round(x Q / a), their sum, the step a / Q (divided by rms(x) with the norm), then the exact
int32 sums sum_i c_i L_i - sum_i L_i = sum_i t_i L_i and y = sums * step * scale. The levels and the
integer sums are bit-identical to ``bitlinear.ternary_matmul_reference``; the rms, summed in the
kernel's own fixed order, may differ from torch's in the last bit. Where no compiler is found, or
the CPU has no AVX2, BitLinear keeps its int8 path.

The same library serves training: ``quantised_values`` (the STE's forward values L · step, two
passes over each row where torch's eager form makes eight) and ``norm_backward_`` (the RMSNorm's
Jacobian applied to a gradient), each split by rows over torch's thread count (ctypes releases the
GIL). ``bitlinear`` holds their torch references and uses these where the kernel loads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from seedbed.data.cache import cache_dir
from seedbed.hardware import cpu_flags

BLOCK = 128  # weights per 32-byte block of codes
SOURCE = "ternary_kernel.c"
ROWS_PER_THREAD = 64  # below this many rows a thread costs more than it saves


def padded_width(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """(out, in) trits in {-1, 0, 1} -> (out, padded_width(in) / 4) uint8 codes in the layout above."""
    rows, width = trits.shape
    codes = torch.ones(rows, padded_width(width), dtype=torch.uint8)  # padding: t = 0
    codes[:, :width] = (trits.to(torch.int16) + 1).to(torch.uint8)
    quarters = codes.view(rows, -1, 4, 32)  # (rows, blocks, bit pair, byte)
    return (quarters[:, :, 0] | quarters[:, :, 1] << 2 | quarters[:, :, 2] << 4 | quarters[:, :, 3] << 6).view(rows, -1)


def unpack_trits(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of ``pack_trits``: (out, in) int8 trits."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    quarters = (codes.view(codes.shape[0], -1, 1, 32) >> shifts) & 3
    return (quarters.reshape(codes.shape[0], -1)[:, :in_features].to(torch.int8) - 1)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel for this machine, built once into the cache folder; None where that fails
    or the build has no vector path (the int8 path is then faster)."""
    source = resources.files("seedbed.model").joinpath(SOURCE).read_bytes()
    cc, machine = compiler(), cpu_flags()
    if cc is None or not {"avx2", "fma"} <= machine:
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    key = hashlib.sha256(source + " ".join([cc, *flags, *sorted(machine)]).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"ternary-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            source_path = Path(tmp) / SOURCE
            source_path.write_bytes(source)
            built = Path(tmp) / library.name
            result = subprocess.run([cc, *flags, str(source_path), "-o", str(built), "-lm"], capture_output=True)
            if result.returncode != 0:
                return None
            os.replace(built, library)  # atomic: a concurrent build leaves one whole file
    try:
        kernel = ctypes.CDLL(str(library))
    except OSError:  # a cache on a noexec mount, a foreign file: run without the kernel
        return None
    if kernel.seedbed_kernel_isa() == 0:
        return None
    kernel.seedbed_ternary_linear.restype = None
    kernel.seedbed_ternary_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
                                              ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    kernel.seedbed_quantised_values.restype = None
    kernel.seedbed_quantised_values.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                                ctypes.c_int, ctypes.c_void_p]
    kernel.seedbed_norm_backward.restype = None
    kernel.seedbed_norm_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return kernel


def packed_ternary_linear(x: torch.Tensor, codes: torch.Tensor, in_features: int, scale: float, bits: int,
                          norm: bool) -> torch.Tensor:
    """The inference BitLinear on packed codes: (..., in) float -> (..., out) float32."""
    kernel = load_kernel()
    rows = x.reshape(-1, in_features).float().contiguous()
    m, n, width = rows.shape[0], codes.shape[0], codes.shape[1] * 4
    out = torch.empty(m, n, dtype=torch.float32)
    levels = torch.empty(m, width, dtype=torch.int8)  # the kernel's scratch
    kernel.seedbed_ternary_linear(rows.data_ptr(), m, in_features, codes.data_ptr(), n, width, scale,
                                  float(2 ** (bits - 1) - 1), int(norm), levels.data_ptr(), out.data_ptr())
    return out.view(*x.shape[:-1], n)


@cache
def thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seedbed-kernel")


def over_rows(m: int, run: Callable[[int, int], None]) -> None:
    """run(first, count) on consecutive row ranges covering m rows, one range per torch thread."""
    workers = max(1, min(torch.get_num_threads(), m // ROWS_PER_THREAD))
    if workers == 1:
        run(0, m)
        return
    bounds = [m * i // workers for i in range(workers + 1)]
    list(thread_pool(workers).map(lambda i: run(bounds[i], bounds[i + 1] - bounds[i]), range(workers)))


def quantised_values(x: torch.Tensor, bits: int, norm: bool) -> torch.Tensor:
    """(..., k) float32 CPU -> L · step [/ rms(x)] per row (``bitlinear.reference_quantised_values``)."""
    kernel, k = load_kernel(), x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty_like(rows)
    size = rows.element_size() * k
    levels_max = float(2 ** (bits - 1) - 1)
    over_rows(rows.shape[0], lambda first, count: kernel.seedbed_quantised_values(
        rows.data_ptr() + first * size, count, k, levels_max, int(norm), out.data_ptr() + first * size))
    return out.view(x.shape)


def norm_backward_(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The parameter-free RMSNorm's backward, in place on a contiguous float32 CPU ``grad``
    (``bitlinear.reference_norm_backward``)."""
    kernel, k = load_kernel(), x.shape[-1]
    rows, out = x.reshape(-1, k).contiguous(), grad.view(-1, k)
    size = rows.element_size() * k
    over_rows(rows.shape[0], lambda first, count: kernel.seedbed_norm_backward(
        rows.data_ptr() + first * size, out.data_ptr() + first * size, count, k))
    return grad
