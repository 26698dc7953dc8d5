"""Where seedbed keeps downloaded and derived data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SEEDBED_CACHE`` if set, else ``~/.cache/seedbed`` (not created here)."""
    configured = os.environ.get("SEEDBED_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "seedbed"
