"""Peak memory of one ``seedbed`` command, measured as the operating system saw it.

Each phase (train, pack, eval, generate) runs as its own ``python -m seedbed`` process, so its
peak resident set is its own and not the high-water mark a previous phase left in the same
process. The peak comes from the kernel's accounting of the finished child (``wait4``'s
``ru_maxrss``), which counts everything the process touched: torch, the data, the allocator's
free lists; nothing is sampled, so no short peak is missed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_mib: float  # the child's maximum resident set size
    seconds: float


def run_measured(args: list[str], timeout: float = 3600.0, env: dict[str, str] | None = None) -> Measured:
    """Run ``seedbed ARGS`` in a fresh process; its exit code, output, peak RSS and wall time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "seedbed", *args], stdout=out, stderr=err, env=env)
        while True:  # wait4 reaps the child and returns its resource usage, which Popen.wait would discard
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Measured(child.returncode, out.read(), err.read(), usage.ru_maxrss / 1024, seconds)
