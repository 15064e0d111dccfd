"""Glue a chapter's numbers into the book under one key prefix per chapter (``atlas_``, ``kv_``, …), and the
formatting helpers the chapters share for prose and tables."""

from __future__ import annotations

import re
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


# --- formatting for prose and tables (the chapters' shared helpers) ----------------------------------------


def glue_key(*parts) -> str:
    """A glue key from arbitrary names: runs of non-word characters become "_" (model ids hold dots,
    dashes and slashes), e.g. ``glue_key("xa", "qwen2.5-coder-0.5b", "o_h")`` = "xa_qwen2_5_coder_0_5b_o_h"."""
    return "_".join(re.sub(r"\W+", "_", str(p)).strip("_") for p in parts)


def number(x, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; "—" for None, NaN or infinity (a figure that was not measured)."""
    return "—" if x is None or not np.isfinite(x) else format(x, spec)


def with_ci(value, ci, spec: str = ".3f") -> str:
    """ "value [lo, hi]"; "—" when there is no value."""
    return "—" if value is None else f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def listing(items, empty: str = "none in this run") -> str:
    """Names for prose: "a", "a and b", "a, b and c"; ``empty`` when there are none."""
    items = [str(i) for i in items]
    if not items:
        return empty
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def span(values, spec: str) -> str:
    """ "a" when all values agree once formatted with ``spec``, else "min to max"; "n/a" when there are none."""
    values = list(values)
    if not values:
        return "n/a"
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo} to {hi}"
