"""Glue a chapter's numbers into the book under one key prefix per chapter (``atlas_``, ``kv_``, …), and the
formatting helpers the chapters share for prose and tables."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np


class Glue:
    """``g(key, value)`` glues ``value`` as ``<prefix>_<key>`` (not displayed); ``g.estimate`` and ``g.row``
    glue a figure with its 95% interval as ``<key>``, ``<key>_lo``, ``<key>_hi``.

    numpy scalars become Python numbers, which ``{glue:text}`` formats (it cannot parse numpy reprs).
    Every call returns None, so a cell that ends with one prints nothing on the page.
    """

    def __init__(self, prefix: str, glue: Callable | None = None):
        if glue is None:
            from myst_nb import glue  # a book dependency; imported only where chapters run
        self.prefix, self._glue = prefix, glue

    def __call__(self, key: str, value: Any) -> None:
        if isinstance(value, np.generic):
            value = value.item()
        self._glue(f"{self.prefix}_{key}", value, display=False)

    def estimate(self, key: str, est, spec: str | None = None) -> None:
        """Glue an ``interval.Estimate``: value, lo and hi as numbers, and with ``spec`` also "value [lo, hi]"
        as ``<key>_ci`` (``estimate_text``)."""
        self(key, est.value), self(f"{key}_lo", est.lo), self(f"{key}_hi", est.hi)
        if spec is not None:
            self(f"{key}_ci", estimate_text(est.value, est.lo, est.hi, spec))

    def row(self, key: str, row, name: str) -> None:
        """Glue a row's ``name``, ``name_lo`` and ``name_hi`` (a dict, a pandas row) as ``key``, ``key_lo``, ``key_hi``."""
        for suffix in ("", "_lo", "_hi"):
            self(f"{key}{suffix}", float(row[f"{name}{suffix}"]))


def prefixed_glue(prefix: str) -> Glue:
    """The chapter's ``g``: ``Glue(prefix)``."""
    return Glue(prefix)


# --- formatting for prose and tables (the chapters' shared helpers) ----------------------------------------


def glue_key(*parts) -> str:
    """A glue key from arbitrary names: runs of non-word characters become "_" (model ids hold dots,
    dashes and slashes), e.g. ``glue_key("xa", "qwen2.5-coder-0.5b", "o_h")`` = "xa_qwen2_5_coder_0_5b_o_h"."""
    return "_".join(re.sub(r"\W+", "_", str(p)).strip("_") for p in parts)


def number(x, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; "—" for None, NaN or infinity (a figure that was not measured)."""
    return "—" if x is None or not np.isfinite(x) else format(x, spec)


def estimate_text(value, lo, hi, spec: str = ".3f") -> str:
    """ "value [lo, hi]" with ``spec``; a fixed-point ``spec`` shows figures of 1,000 and more without decimals
    and with thousands separators (a failed run's perplexity reads in the thousands)."""
    if spec.endswith("f") and value is not None and np.isfinite(value) and abs(value) >= 1000 and "," not in spec:
        spec = ",.0f"
    return f"{number(value, spec)} [{number(lo, spec)}, {number(hi, spec)}]"


def row_interval(row, name: str, spec: str) -> str:
    """ "value [lo, hi]" of a row's ``name``, ``name_lo``, ``name_hi``, for tables."""
    return estimate_text(row[name], row[f"{name}_lo"], row[f"{name}_hi"], spec)


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
