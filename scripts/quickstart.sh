#!/usr/bin/env bash
# Set up, train the default preset on the default corpus, report val bpb, sample text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=runs/quickstart-$(date +%Y%m%d-%H%M%S)
.venv/bin/seedbed train --preset gpt --minutes "${MINUTES:-5}" --out "$run"
.venv/bin/seedbed eval "$run" --split test
.venv/bin/seedbed generate "$run" --prompt "ROMEO." --tokens 300 --seed 0
