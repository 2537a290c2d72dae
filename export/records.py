"""The small JSON records an export keeps beside its models, which ``sdengine.model_dir`` reads to know
what the models take (ControlNets, an IP-Adapter, PAG's layers, a DeepCache branch, FreeU's scales)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_record(out_dir: Path, relative: Path, document: dict[str, Any] | None) -> None:
    """Write ``document`` to ``out_dir / relative``; None removes the record that an earlier export into
    the same directory left, so that it never outlives what it described."""
    path = out_dir / relative
    if document is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
