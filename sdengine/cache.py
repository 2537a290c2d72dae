"""Where sdengine keeps what it makes for reuse: ``$SDENGINE_CACHE``, else ``~/.cache/sdengine``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SDENGINE_CACHE", Path.home() / ".cache" / "sdengine"))
