"""Glue a chapter's numbers, figures and tables into the book under one key prefix per chapter (``atlas_``,
``kv_``, …), with the data and provenance of every figure and table, and the formatting helpers the
chapters share for prose and tables.

A chapter makes its ``g`` once, after its imports::

    g = chapter_glue("models", chapter="models", model=model, corpus="britannica", results_dir=results_dir)
    g("n_models", 3)                                        # a number for the prose: models_n_models
    g.figure("fig_ppl", fig, data=df, sample="8 windows")   # figure + data CSV + models_fig_ppl_prov
    g.table("table", df, sample="3 models")                 # table + data CSV + models_table_prov
    g.finish()                                              # last cell: the opening box, models_run_box
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from atlas_core import interval, provenance


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChapterRun:
    """What a chapter's figures and tables are glued with: the chapter, its model and default corpus, its
    results folder, the run's ``provenance.RunInfo`` and the start of its wall clock (``time.perf_counter``)."""

    chapter: str
    model: str
    corpus: str
    results_dir: Path
    info: provenance.RunInfo
    started: float


class Glue:
    """``g(key, value)`` glues ``value`` as ``<prefix>_<key>`` (not displayed); ``g.estimate`` and ``g.row``
    glue a figure with its 95% interval as ``<key>``, ``<key>_lo``, ``<key>_hi``; with a ``ChapterRun``
    (``chapter_glue``), ``g.figure`` and ``g.table`` glue a figure or table with its data file and
    provenance line, and ``g.finish`` the chapter's opening box.

    numpy scalars become Python numbers, which ``{glue:text}`` formats (it cannot parse numpy reprs).
    Every call returns None, so a cell that ends with one prints nothing on the page.
    """

    def __init__(self, prefix: str, glue: Callable | None = None, *, run: ChapterRun | None = None):
        if glue is None:
            from myst_nb import glue  # a book dependency; imported only where chapters run
        self.prefix, self._glue, self.run = prefix, glue, run
        self.values: dict[str, Any] = {}  # what was glued, by full key (``intervals`` reads it)

    def __call__(self, key: str, value: Any) -> None:
        if isinstance(value, np.generic):
            value = value.item()
        self.values[f"{self.prefix}_{key}"] = value
        self._glue(f"{self.prefix}_{key}", value, display=False)

    def estimate(self, key: str, est, spec: str | None = None) -> None:
        """Glue an ``interval.Estimate``: value, lo and hi as numbers, and with ``spec`` also "value [lo, hi]"
        as ``<key>_ci`` (``estimate_text``)."""
        self(key, est.value), self(f"{key}_lo", est.lo), self(f"{key}_hi", est.hi)
        if spec is not None:
            self(f"{key}_ci", estimate_text(est.value, est.lo, est.hi, spec))

    def intervals(self, specs: dict[str, str], *, ratios: dict[str, str] | None = None) -> None:
        """Glue ``<key>_ci``, the text "value [lo, hi]" of figures already glued as ``key``, ``key_lo``, ``key_hi``,
        so that the pages quote every interval in the book's one format (``estimate_text``; a ratio as
        "1.43× [1.05×, 1.61×]", ``times_text``) rather than assembling it from three glued numbers.

        Args:
            specs: key (without the prefix) → format spec (".3f", "+.2%", "auto", ``interval.SIG3``).
            ratios: the same, for ratios written with ×.
        Raises:
            KeyError: a key, or its ``_lo`` or ``_hi``, was not glued before.
        """
        for table, text in ((specs, estimate_text), (ratios or {}, times_text)):
            for key, spec in table.items():
                full = [f"{self.prefix}_{key}{s}" for s in ("", "_lo", "_hi")]
                missing = [k for k in full if k not in self.values]
                if missing:
                    raise KeyError(f"intervals: {', '.join(missing)} not glued before; glue the figure and its bounds first")
                self(f"{key}_ci", text(*(float(self.values[k]) for k in full), spec))

    def row(self, key: str, row, name: str) -> None:
        """Glue a row's ``name``, ``name_lo`` and ``name_hi`` (a dict, a pandas row) as ``key``, ``key_lo``, ``key_hi``."""
        for suffix in ("", "_lo", "_hi"):
            self(f"{key}{suffix}", float(row[f"{name}{suffix}"]))

    # --- figures and tables with their data and provenance ------------------------------------------

    def figure(self, key: str, fig, *, data, sample: str, corpus: str | None = None) -> None:
        """Glue a matplotlib figure as ``<prefix>_<key>``, write ``data`` (the numbers it plots) beside it and
        glue its provenance line as ``<prefix>_<key>_prov``; then close the figure.

        Args:
            key: the figure's key (without the prefix).
            fig: a matplotlib figure (sized with ``figures.figsize``).
            data: the plotted numbers, a pandas DataFrame or Series (written as CSV, ``provenance.data_path``).
            sample: the sample size in words, for the provenance line ("8 windows of 512 tokens").
            corpus: the corpus when it differs from the chapter's.

        Raises:
            RuntimeError: this ``Glue`` has no ``ChapterRun`` (made by ``prefixed_glue``, not ``chapter_glue``).
            TypeError: ``data`` is not a DataFrame or Series.
            figures.FigureStyleError: the figure is wider than the text column or has text below 9 pt.
        """
        import matplotlib.pyplot as plt

        from atlas_core.figures import check_figure

        check_figure(fig)
        self._with_data(key, fig, data, sample, corpus)
        plt.close(fig)

    def table(self, key: str, table, *, sample: str, data=None, corpus: str | None = None) -> None:
        """Glue a table (a DataFrame, or a pandas Styler for formatted cells) as ``<prefix>_<key>``, write its
        data as CSV and glue its provenance line as ``<prefix>_<key>_prov``.

        Args:
            key: the table's key (without the prefix).
            table: what the page shows: a DataFrame or a Styler.
            sample: the sample size in words, for the provenance line.
            data: the numbers behind it (unformatted, with intervals); default: the table's own data.
            corpus: the corpus when it differs from the chapter's.

        Raises:
            RuntimeError, TypeError: as ``figure``.
        """
        if data is None:
            data = getattr(table, "data", table)  # a Styler keeps its DataFrame in .data
        self._with_data(key, table, data, sample, corpus)

    def finish(self) -> None:
        """Glue the chapter's opening box as ``<prefix>_run_box`` (model, commit, versions, hardware, date and
        the wall time since ``chapter_glue``): call it in the chapter's last cell.

        Raises:
            RuntimeError: this ``Glue`` has no ``ChapterRun``.
        """
        from IPython.display import Markdown

        run = self._run()
        wall = time.perf_counter() - run.started
        self("run_box", Markdown(provenance.run_box(run.info, chapter=run.chapter, model=run.model, wall_s=wall)))
        self("wall_s", round(wall, 1))

    def _run(self) -> ChapterRun:
        if self.run is None:
            raise RuntimeError("this Glue has no chapter run: make it with chapter_glue(...) to glue figures, "
                               "tables and the opening box")
        return self.run

    def _with_data(self, key: str, shown, data, sample: str, corpus: str | None) -> None:
        """Write ``data`` to ``data_path``, glue ``shown`` and the provenance line."""
        import pandas as pd
        from IPython.display import Markdown

        run = self._run()
        if not isinstance(data, (pd.DataFrame, pd.Series)):
            raise TypeError(f"{key}: data must be a pandas DataFrame or Series, not {type(data).__name__}")
        full = f"{self.prefix}_{key}"
        path = Path(run.results_dir) / provenance.data_path(run.chapter, full)
        path.parent.mkdir(parents=True, exist_ok=True)
        named_index = not isinstance(data.index, pd.RangeIndex) or data.index.name is not None
        data.to_csv(path, index=named_index)
        self(key, shown)
        line = provenance.provenance_line(run.info, chapter=run.chapter, key=full, model=run.model,
                                          corpus=corpus or run.corpus, sample=sample)
        self(f"{key}_prov", Markdown(line))


def chapter_glue(prefix: str, *, chapter: str, model: str, corpus: str, results_dir,
                 glue: Callable | None = None) -> Glue:
    """The chapter's ``g``: a ``Glue`` that also glues figures and tables with their data and provenance.

    It applies the book's figure style (``figures.use_book_style``), records the run (``provenance.run_info``)
    and starts the chapter's wall clock, read by ``g.finish()``.

    Args:
        prefix: the chapter's glue-key prefix ("models", "kv", …).
        chapter: the chapter's name (``notebooks/<chapter>.py``).
        model: the run's model.
        corpus: the corpus most of its figures are measured on (a figure may name another).
        results_dir: the chapter's results folder (its ``results_dir`` parameter).
        glue: the glue function (tests pass a recorder; default myst-nb's).
    """
    from atlas_core.figures import use_book_style

    use_book_style()
    run = ChapterRun(chapter=chapter, model=model, corpus=corpus, results_dir=Path(results_dir),
                     info=provenance.run_info(), started=time.perf_counter())
    return Glue(prefix, glue, run=run)


def prefixed_glue(prefix: str) -> Glue:
    """The chapter's ``g``: ``Glue(prefix)``."""
    return Glue(prefix)


# --- formatting for prose and tables (the chapters' shared helpers) ----------------------------------------


def glue_key(*parts) -> str:
    """A glue key from arbitrary names: runs of non-word characters become "_" (model ids hold dots,
    dashes and slashes), e.g. ``glue_key("xa", "qwen2.5-coder-0.5b", "o_h")`` = "xa_qwen2_5_coder_0_5b_o_h"."""
    return "_".join(re.sub(r"\W+", "_", str(p)).strip("_") for p in parts)


def number(x, spec: str = ".3f") -> str:
    """``x`` formatted with ``spec``; "—" for None, NaN or infinity (a figure that was not measured). A value that
    rounds to zero prints unsigned ("0.000", not "-0.000" or "+0.000%": ``interval.unsigned_zero``)."""
    return interval.format_number(x, spec)


def estimate_text(value, lo, hi, spec: str = ".3f") -> str:
    """ "value [lo, hi]" under the book's number rules (``interval.number_spec``: one spec for all three numbers,
    thousands as integers with separators, a sign on every number of a signed quantity, "auto" and
    ``interval.SIG3`` precisions)."""
    return interval.interval_text(value, lo, hi, spec)


def times_text(value, lo, hi, spec: str = ".2f") -> str:
    """A ratio of speeds, times or sizes with its interval, the × on every number: "2.19× [2.10×, 2.31×]"."""
    spec = interval.number_spec(spec, value, lo, hi)
    return f"{number(value, spec)}× [{number(lo, spec)}×, {number(hi, spec)}×]"


def row_interval(row, name: str, spec: str) -> str:
    """ "value [lo, hi]" of a row's ``name``, ``name_lo``, ``name_hi``, for tables."""
    return estimate_text(row[name], row[f"{name}_lo"], row[f"{name}_hi"], spec)


def with_ci(value, ci, spec: str = ".3f") -> str:
    """ "value [lo, hi]" under the book's number rules (``estimate_text``); "—" when there is no value."""
    return "—" if value is None else estimate_text(value, ci[0], ci[1], spec)


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """A count with its noun: "1 block", "2 blocks", "1,024 tokens" (``plural_form`` for irregular nouns)."""
    return f"{n:,} {noun if n == 1 else (plural_form or noun + 's')}"


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
