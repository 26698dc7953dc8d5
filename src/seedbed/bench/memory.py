"""Peak memory of one ``seedbed`` command, measured as the operating system saw it.

Each phase (train, pack, eval, generate) runs as its own ``python -m seedbed`` process, so its
peak resident set is its own and not the high-water mark a previous phase left in the same
process. The peak comes from the kernel's accounting of the finished process (``ru_maxrss``),
which counts everything it touched: torch, the data, the allocator's free lists; nothing is
sampled, so no short peak is missed.

One trap: Linux starts a forked child's ``ru_maxrss`` at its parent's resident size (the copied
address space's high-water mark survives the exec), so a command started straight from a large
process (a test worker holding 1.3 GB) would report at least that. The command is therefore
started by a small trampoline process, and its peak read there (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


# Runs ARGV[2:], writes its children's peak RSS (KiB) to ARGV[1], exits with the command's code.
TRAMPOLINE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as report:
    report.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_mib: float  # the child's maximum resident set size
    seconds: float


def run_measured(args: list[str], timeout: float = 3600.0, env: dict[str, str] | None = None) -> Measured:
    """Run ``seedbed ARGS`` in a fresh process; its exit code, output, peak RSS and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path, peak_path = (Path(tmp) / name for name in ("stdout", "stderr", "peak"))
        start = time.perf_counter()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            child = subprocess.Popen([sys.executable, "-c", TRAMPOLINE, str(peak_path), sys.executable, "-m", "seedbed",
                                      *args], stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # the trampoline and the command it started
                child.wait()
        seconds = time.perf_counter() - start
        peak_kib = int(peak_path.read_text()) if peak_path.exists() else 0
        return Measured(child.returncode, out_path.read_text(), err_path.read_text(), peak_kib / 1024, seconds)
