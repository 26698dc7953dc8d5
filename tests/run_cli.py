"""``seedbed ARGS`` for the tests, run in the test's own process.

A fresh ``python -m seedbed`` spends about 3.5 s importing torch before it does anything, and
the suite runs the CLI some hundred times: in-process, the same ``main`` gives the same exit
code, stdout and stderr (an uncaught exception fails the test, as a traceback would). A call
that needs a process of its own (another environment, a signal, torchrun) passes ``env`` or
``cwd`` and gets one.
"""

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from seedbed.cli import main


def seedbed(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    if kwargs:
        return subprocess.run([sys.executable, "-m", "seedbed", *args], capture_output=True, text=True,
                              timeout=timeout, **kwargs)
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: --help, and bad arguments (exit code 2)
            code = exit_.code if isinstance(exit_.code, int) else 0
    return subprocess.CompletedProcess(["seedbed", *args], code, stdout.getvalue(), stderr.getvalue())
