"""Where sdengine keeps what it makes for reuse: ``$SDENGINE_CACHE``, else ``~/.cache/sdengine``."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SDENGINE_CACHE", Path.home() / ".cache" / "sdengine"))


def kept(folder: str, name: str, marker: str, make: Callable[[Path], object], what: str | None) -> Path:
    """``cache_dir() / folder / name``, made by ``make(target)`` unless it holds ``marker`` already (a
    directory without it is one cut short, made again); ``what`` (if any) is said on stderr as it is
    converted."""
    target = cache_dir() / folder / name
    if not (target / marker).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        if what is not None:
            print(f"converting {what} to diffusers format in {target} (once)", file=sys.stderr)
        make(target)
    return target
