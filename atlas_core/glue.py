"""Glue a chapter's numbers into the book under one key prefix per chapter (``atlas_``, ``kv_``, …)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def prefixed_glue(prefix: str) -> Callable[[str, Any], Any]:
    """A ``g(key, value)`` that glues ``value`` as ``<prefix>_<key>`` (not displayed) and returns it.

    numpy scalars become Python numbers, which ``{glue:text}`` formats (it cannot parse numpy reprs).
    """
    from myst_nb import glue  # a book dependency; imported only where chapters run

    def g(key: str, value: Any) -> Any:
        if isinstance(value, np.generic):
            value = value.item()
        glue(f"{prefix}_{key}", value, display=False)
        return value

    return g
