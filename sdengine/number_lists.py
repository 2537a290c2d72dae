"""Numbers separated by commas, as the command line's options take them (``--freeu``, ``--apg``,
``--timesteps``, ``--sigmas``)."""

from __future__ import annotations

from sdengine.errors import InvalidArgumentError


def parse_numbers(text: str, option: str, takes: str, count: int | None = None) -> tuple[float, ...]:
    """The numbers of ``text`` (spaces around them allowed); InvalidArgumentError saying that ``option``
    takes ``takes`` where one is not a number or, with ``count``, where there are not that many."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"{option} takes {takes}, got {text!r}") from None
    if count is not None and len(values) != count:
        raise InvalidArgumentError(f"{option} takes {takes}, got {len(values)}")
    return values
