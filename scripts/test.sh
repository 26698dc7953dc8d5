#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: one pytest worker per core (pytest-xdist), each
# process on one thread, which on 2 cores is about twice as fast as one worker on both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n auto "$@"
