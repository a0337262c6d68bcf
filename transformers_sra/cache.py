"""Where transformers-sra caches what it builds (the demo checkpoint, base-model evaluations)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$TRANSFORMERS_SRA_CACHE``, else ``~/.cache/transformers_sra``."""
    env = os.environ.get("TRANSFORMERS_SRA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "transformers_sra"
