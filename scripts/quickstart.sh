#!/usr/bin/env bash
# Set up, train the default preset on the default corpus, report val/test bpb,
# pack it into an artifact (bpb before/after packing), and sample text from the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=runs/quickstart-$(date +%Y%m%d-%H%M%S)
.venv/bin/seedbed train --preset gpt --minutes "${MINUTES:-5}" --out "$run"
.venv/bin/seedbed eval "$run" --split test
.venv/bin/seedbed pack "$run" -o "$run/model.seedbed"
.venv/bin/seedbed info "$run/model.seedbed"
.venv/bin/seedbed generate "$run/model.seedbed" --prompt "ROMEO." --tokens 300 --seed 0
