"""Glue a chapter's numbers into the book under one key prefix per chapter (``atlas_``, ``kv_``, …)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def prefixed_glue(prefix: str) -> Callable[[str, Any], None]:
    """A ``g(key, value)`` that glues ``value`` as ``<prefix>_<key>`` (not displayed).

    numpy scalars become Python numbers, which ``{glue:text}`` formats (it cannot parse numpy reprs).
    ``g`` returns None, so a cell that ends with it prints nothing on the page.
    """
    from myst_nb import glue  # a book dependency; imported only where chapters run

    def g(key: str, value: Any) -> None:
        if isinstance(value, np.generic):
            value = value.item()
        glue(f"{prefix}_{key}", value, display=False)

    return g
