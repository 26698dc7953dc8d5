#!/usr/bin/env bash
# Create .venv (seeing system packages, so a GPU machine's own torch is reused),
# install the CPU build of torch only where no torch >= 2.4 is present, then seedbed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then
    echo "setup: installing the CPU build of torch 2.13.0" >&2
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
