"""Model backends: each runs the exported models behind one small interface (:class:`Backend`)."""

from sdengine.backends.base import Backend

__all__ = ["Backend"]
