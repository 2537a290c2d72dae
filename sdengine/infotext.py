"""The AUTOMATIC1111 web UI's "infotext": how it writes an image's settings as text, the form its users read,
paste back into it and share (``prompt``, then ``Negative prompt: ...``, then ``Steps: 20, Sampler: Euler a,
...``; its ``processing.create_infotext``). The HTTP API answers one per image (``info.infotexts``), as the
web UI does."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def quote(value: Any) -> str:
    """A value as the web UI writes it in an infotext: as it is, or as a JSON string where it holds a comma,
    a colon or a line break (which would end it)."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """``prompt``, the negative prompt's line where there is one, and the parameters' line (in the order
    given; a None value is left out, as is a value equal to its name)."""
    fields = ", ".join(
        key if key == value else f"{key}: {quote(value)}"
        for key, value in parameters.items()
        if value is not None
    )
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{fields}".strip()
