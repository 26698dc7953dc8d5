#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: one pytest worker per core (pytest-xdist), each
# process on one thread (most tests are small tensors and process start-ups, which one thread
# per core keeps busy); about 390 s on a 2-core AVX2-only EPYC (2026-11-28), the slowest tests listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n auto --durations=15 "$@"
