"""The book's one figure style: sizes that fit the text column at 100%, one set of font sizes, and one
colour (and marker) per method or model that never changes between figures.

Every chapter calls ``use_book_style()`` once (``glue.chapter_glue`` does it) and sizes its figures with
``figsize``; a line, bar or marker that stands for a method takes ``style(name)`` (or ``color(name)``).

Sizes. Figures are saved as SVG, whose width and height are in points, so the browser draws them at
96 px per inch at 100% zoom whatever the screen: a figure ``COLUMN_IN`` inches wide is 672 px wide, inside
the book theme's article column (measured in Chromium with sphinx-book-theme 1.3.0: 740 px = 46.25 rem
at a 1280 px window), and a 9 pt label is 12 px tall, never scaled down. On a phone (420 px) the
column is narrower and figures scale down; a click opens them full size (``book/_static/atlas.js``). Multi-panel figures are as wide as the column and taller, never wider.

Colours. The Okabe–Ito palette (Okabe & Ito 2008, "Color Universal Design") followed by Paul Tol's
"muted" scheme (Tol 2021, "Colour Schemes", SRON/EPS/TN/09-002): both are distinguishable under the
common colour-vision deficiencies. Known methods, models and layer types have a fixed entry in ``COLORS``; a
variant ("kivi lloyd-max", "query-tc pre-RoPE", "top-k W = 32") takes its family's colour and a marker and dash
of its own (``style``; distinct among the variants a figure draws when it passes them as ``among``); any other
name gets a deterministic colour from the same palette (a hash of the name, not of the run).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# --- sizes (inches) and fonts (points) --------------------------------------------------------------

PX_PER_IN = 96  # CSS pixels per inch: an SVG of w pt is drawn w * 96 / 72 px wide at 100% zoom
COLUMN_IN = 7.0  # the text column (≈ 46 rem = 736 px) less a margin for the tight bounding box
FONT_PT = {"base": 10, "label": 10, "title": 10, "tick": 9, "legend": 9, "annotation": 9}
MIN_FONT_PT = 9  # nothing on a figure is smaller (labels readable at 100% zoom)
FORMAT = "svg"  # what the notebook's inline backend emits, and so what myst-nb glues

# --- colours -------------------------------------------------------------------------------------------

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
# Colours a name hashes into: both palettes without black (reserved for fp / dense references) and the two
# pale yellows (too faint for lines on white).
PALETTE = tuple(c for c in OKABE_ITO + TOL_MUTED if c not in ("#000000", "#F0E442", "#DDCC77"))

COLORS = {
    # references
    "fp": "#000000", "dense": "#000000", "full precision": "#000000",
    # weight quantization (nqp chapter)
    "rtn": "#E69F00", "gptq": "#0072B2", "awq": "#009E73",
    "rot-fisher": "#D55E00", "fisher": "#D55E00", "nqp": "#D55E00", "nqp-scaled": "#882255",
    "rot-haar": "#CC79A7", "random-rotation": "#CC79A7",
    "rot-hadamard": "#56B4E9", "hadamard": "#56B4E9",
    # KV-cache quantization (kvquant chapter)
    "per-token": "#999933", "per-channel": "#44AA99", "kivi": "#332288", "headq": "#CC6677",
    "query-tc": "#117733",
    # sparse attention (sparse chapter)
    "top-k": "#AA4499", "condensate": "#AA4499", "pages": "#88CCEE", "quest": "#88CCEE",
    "anchor": "#E69F00", "window": "#E69F00", "anchor+window": "#E69F00",
    # models (models and crossarch chapters)
    "smollm2-135m": "#0072B2", "gemma3-270m": "#D55E00", "qwen2.5-coder-0.5b": "#009E73",
    # layer types of a decoder (nqp chapter; wquant.layers.LAYER_TYPES): Tol's muted indigo, cyan, green and
    # rose, four hues apart in lightness too (hashed, "attention out" and "MLP down" fell on close pinks)
    "attention in (q, k, v)": "#332288", "attention out": "#88CCEE", "MLP in (gate, up)": "#117733",
    "MLP down": "#CC6677",
}
# Markers and dashes of a family's variants; the family itself takes the first of each.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", ":", "-.")


def family(name: str) -> str:
    """The known name a method belongs to: ``name`` itself when it is in ``COLORS``, else the longest key of
    ``COLORS`` that starts it followed by a space or "(" ("kivi lloyd-max" → "kivi", "headq (whitened)" →
    "headq"); ``name`` unchanged when none does."""
    if name in COLORS:
        return name
    stems = [k for k in COLORS if name.startswith(k + " ") or name.startswith(k + "(")]
    return max(stems, key=len) if stems else name


def _hash_index(name: str, n: int) -> int:
    """A stable index in [0, n) from ``name`` (sha256, so the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % n


def color(name: str) -> str:
    """The colour of a method or model, as "#RRGGBB": its family's entry of ``COLORS``, or for a name no
    family covers, a colour of ``PALETTE`` chosen by a hash of the name (the same in every figure and run)."""
    fam = family(str(name))
    return COLORS.get(fam) or PALETTE[_hash_index(fam, len(PALETTE))]


def _natural(name: str) -> list:
    """A sort key that orders numbers inside names by value ("W = 8" before "W = 16")."""
    return [(0, float(part), "") if i % 2 else (1, 0.0, part)
            for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", name)) if part]


def style(name: str, *, among: Iterable[str] | None = None) -> dict:
    """Matplotlib keyword arguments for a method's line or markers: ``color``, ``marker``, ``linestyle``.

    The family itself is drawn with circles and a solid line; each variant ("kivi lloyd-max", "top-k W = 32")
    keeps the family colour and takes a marker and dash of its own, so it stays apart from the family.

    Args:
        name: a method, model or layer type, or a variant of one ("<family> <suffix>").
        among: the names a figure draws together (or a whole sweep, to keep the styles equal across the
            figures that draw part of it). The variants of ``name``'s family among them take distinct markers
            (then distinct marker and dash pairs) in natural order of their names, numbers by value. Without
            it a variant's marker and dash follow a hash of its suffix: the same in every figure, but two
            variants of one family may share them.
    Returns:
        {"color", "marker", "linestyle"}.
    Raises:
        ValueError: ``name`` is a variant missing from ``among``, or its family has more variants among them
            than there are marker and dash pairs to tell apart (18).
    """
    name = str(name)
    fam = family(name)
    if fam == name:
        return {"color": color(name), "marker": MARKERS[0], "linestyle": DASHES[0]}
    n_markers, n_dashes = len(MARKERS) - 1, len(DASHES) - 1
    if among is None:
        suffix = name[len(fam):].strip()
        return {"color": color(name), "marker": MARKERS[1 + _hash_index(suffix, n_markers)],
                "linestyle": DASHES[1 + _hash_index(suffix, n_dashes)]}
    variants = sorted({str(n) for n in among if str(n) != fam and family(str(n)) == fam}, key=_natural)
    if name not in variants:
        raise ValueError(f"style: {name!r} is not among the names drawn with it ({variants})")
    if len(variants) > n_markers * n_dashes:
        raise ValueError(f"style: {len(variants)} variants of {fam!r} in one figure; at most "
                         f"{n_markers * n_dashes} can be told apart by marker and dash")
    i = variants.index(name)
    return {"color": color(name), "marker": MARKERS[1 + i % n_markers], "linestyle": DASHES[1 + i // n_markers]}


# --- sizes ---------------------------------------------------------------------------------------------


def figsize(rows: int = 1, cols: int = 1, *, panel_aspect: float = 0.6, width: float = 1.0) -> tuple[float, float]:
    """(width, height) in inches for a grid of ``rows`` × ``cols`` panels that fits the text column.

    Args:
        rows, cols: panels of the figure.
        panel_aspect: each panel's height over its width (0.6: landscape; 1: square heat maps).
        width: fraction of the column the figure spans (0 < width ≤ 1).

    Returns:
        (width_in, height_in): the width is ``width * COLUMN_IN``, never more; the height follows the panels,
        plus room for the axis labels (0.45 in) of each row.

    Raises:
        ValueError: rows or cols below 1, a width outside (0, 1], a panel_aspect ≤ 0.
    """
    if rows < 1 or cols < 1 or not 0 < width <= 1 or panel_aspect <= 0:
        raise ValueError(f"figsize: rows, cols ≥ 1, 0 < width ≤ 1, panel_aspect > 0 (got {rows}, {cols}, "
                         f"{width}, {panel_aspect})")
    w = COLUMN_IN * width
    return w, rows * (w / cols * panel_aspect + 0.45)


def rc_params() -> dict:
    """The matplotlib settings of the book's style (fonts in points, SVG output, a light grid, no top and
    right spines, deterministic SVG ids so that reruns write identical files)."""
    from cycler import cycler  # matplotlib's own dependency

    return {
        "font.size": FONT_PT["base"], "axes.labelsize": FONT_PT["label"], "axes.titlesize": FONT_PT["title"],
        "xtick.labelsize": FONT_PT["tick"], "ytick.labelsize": FONT_PT["tick"],
        "legend.fontsize": FONT_PT["legend"], "legend.title_fontsize": FONT_PT["legend"],
        "figure.titlesize": FONT_PT["title"], "figure.figsize": figsize(), "figure.dpi": PX_PER_IN,
        "savefig.dpi": 2 * PX_PER_IN,  # rasterised parts (heat maps) at 2× for sharp zoom
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
        "grid.linewidth": 0.6, "legend.frameon": False, "lines.markersize": 5, "errorbar.capsize": 2,
        "axes.prop_cycle": cycler(color=list(PALETTE)),
        "image.cmap": "viridis", "svg.fonttype": "path", "svg.hashsalt": "atlas",
    }


def use_book_style() -> None:
    """Apply ``rc_params()`` and, inside an IPython kernel, make the inline backend emit ``FORMAT`` (SVG),
    which is what myst-nb glues into the book. Safe to call more than once; outside IPython it only sets
    the matplotlib parameters."""
    import matplotlib

    matplotlib.rcParams.update(rc_params())
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the notebook stack
        return
    if get_ipython() is not None:
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats(FORMAT)


def small_fonts(fig) -> list[str]:
    """Texts of ``fig`` drawn below ``MIN_FONT_PT`` (tick labels, legends, titles, annotations), as
    "text (size pt)"; empty when every text is readable at 100%. Draws the figure first."""
    fig.canvas.draw()
    found = []
    for text in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < MIN_FONT_PT - 1e-9:
            found.append(f"{text.get_text()!r} ({text.get_fontsize():g} pt)")
    return found


class FigureStyleError(ValueError):
    """A figure breaks the book's style: wider than the text column, or with text below ``MIN_FONT_PT``."""


def check_figure(fig) -> None:
    """Refuse a figure a reader could not read at 100% zoom (``Glue.figure`` calls this before gluing).

    Raises:
        FigureStyleError: one line naming what is wrong: a width above ``COLUMN_IN`` (size the figure with
            ``figsize``: drawn wider, it would be scaled down with its labels) or texts below
            ``MIN_FONT_PT`` (``small_fonts``).
    """
    width = fig.get_size_inches()[0]
    problems = [f"{width:.2f} in wide, wider than the {COLUMN_IN} in text column (use figures.figsize)"] \
        if width > COLUMN_IN + 1e-6 else []
    small = small_fonts(fig)
    if small:
        problems.append(f"text below {MIN_FONT_PT} pt: {', '.join(small[:3])}" + (" …" if len(small) > 3 else ""))
    if problems:
        raise FigureStyleError("figure " + "; ".join(problems))
