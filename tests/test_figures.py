"""The book's figure style: sizes inside the text column, readable fonts, one colour per method."""

import matplotlib
import matplotlib.pyplot as plt
import pytest

from atlas_core import figures
from atlas_core.figures import COLORS, OKABE_ITO, PALETTE, TOL_MUTED, color, family, figsize, style
from atlas_core.wquant.layers import LAYER_TYPES


def test_a_method_keeps_its_colour_and_variants_keep_their_family_colour():
    assert color("kivi") == COLORS["kivi"] and color("kivi lloyd-max") == COLORS["kivi"]
    assert color("headq (whitened)") == COLORS["headq"] and color("query-tc pre-RoPE") == COLORS["query-tc"]
    assert family("query-tc static") == "query-tc" and family("per-token") == "per-token"
    assert color("hadamard") == color("rot-hadamard") and color("random-rotation") == color("rot-haar")
    # a variant differs from its family in marker or dash, so both can share a figure
    assert style("kivi lloyd-max") != style("kivi") and style("kivi")["marker"] == "o"
    assert style("kivi lloyd-max") == style("kivi lloyd-max")


def test_methods_of_one_chapter_have_distinct_colours():
    chapters = {
        "nqp": ["fp", "rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled"],
        "kvquant": ["fp", "per-token", "per-channel", "kivi", "headq", "hadamard", "random-rotation", "query-tc"],
        "sparse": ["dense", "top-k", "pages", "anchor+window"],
        "models": ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"],
        "nqp layer types": sorted(set(LAYER_TYPES.values())),
    }
    for chapter, names in chapters.items():
        assert len({color(n) for n in names}) == len(names), chapter


def _rgb(hex_colour: str) -> tuple[int, ...]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_the_layer_types_have_fixed_colour_blind_safe_colours_far_apart():
    types = sorted(set(LAYER_TYPES.values()))  # the labels the nqp chapter draws
    assert len(types) == 4 and all(t in COLORS for t in types)
    assert all(COLORS[t] in OKABE_ITO + TOL_MUTED and COLORS[t] != "#000000" for t in types)
    # every pair apart in RGB (hashed, "attention out" #AA4499 and "MLP down" #CC79A7 were 65 apart)
    gaps = [sum((a - b) ** 2 for a, b in zip(_rgb(COLORS[s]), _rgb(COLORS[t]))) ** 0.5
            for i, s in enumerate(types) for t in types[i + 1:]]
    assert min(gaps) > 100, gaps


def test_variants_drawn_together_take_distinct_markers_in_natural_order():
    windows = [f"top-k W = {w}" for w in (64, 8, 32, 16)]
    looks = {w: style(w, among=windows + ["top-k", "pages", "dense"]) for w in windows}
    assert len({look["marker"] for look in looks.values()}) == 4  # hashed, W = 16 and W = 64 share "P"
    assert all(look["color"] == COLORS["top-k"] and look["marker"] != "o" for look in looks.values())
    assert looks["top-k W = 8"]["marker"] == figures.MARKERS[1]  # 8 < 16 < 32 < 64, by value
    assert looks["top-k W = 64"]["marker"] == figures.MARKERS[4]
    assert style("top-k W = 32", among=reversed(windows)) == looks["top-k W = 32"]  # order given does not matter
    assert style("top-k", among=windows) == style("top-k")  # the family keeps its circle and solid line
    many = [f"kivi g{i}" for i in range(7)]  # more variants than markers: marker and dash pairs stay apart
    assert len({tuple(style(m, among=many).values()) for m in many}) == 7
    with pytest.raises(ValueError, match="not among the names drawn"):
        style("top-k W = 128", among=windows)
    with pytest.raises(ValueError, match="19 variants of 'kivi'"):
        style("kivi g0", among=[f"kivi g{i}" for i in range(19)])


def test_unknown_names_get_a_stable_palette_colour():
    assert color("some-new-method") in PALETTE
    assert color("some-new-method") == color("some-new-method")
    assert len({color(f"method-{i}") for i in range(40)}) > 5  # the hash spreads over the palette
    assert "#000000" not in PALETTE  # black stays the fp / dense reference


def test_figures_fit_the_text_column_and_reject_bad_shapes():
    w, h = figsize()
    assert w == figures.COLUMN_IN and 0 < h < w
    assert figures.COLUMN_IN * figures.PX_PER_IN <= 46 * 16  # inside a 46 rem column at 100%
    assert figsize(2, 3)[0] == w and figsize(2, 3)[1] > figsize(1, 3)[1]
    assert figsize(width=0.5)[0] == w / 2
    for bad in ({"rows": 0}, {"width": 1.5}, {"panel_aspect": 0}):
        with pytest.raises(ValueError):
            figsize(**bad)


def test_the_style_sets_readable_fonts_and_svg(tmp_path):
    figures.use_book_style()
    assert matplotlib.rcParams["svg.hashsalt"] == "atlas"
    fig, ax = plt.subplots(figsize=figsize())
    ax.plot([0, 1], [0, 1], label="fp", **style("fp"))
    ax.set(xlabel="bits", ylabel="perplexity", title="t")
    ax.legend()
    assert figures.small_fonts(fig) == []
    ax.text(0.5, 0.5, "tiny", fontsize=6)
    assert figures.small_fonts(fig) == ["'tiny' (6 pt)"]
    fig.savefig(tmp_path / "a.svg")
    head = (tmp_path / "a.svg").read_text()[:2000]
    assert 'width="504pt"' in head or "width=\"504" in head  # 7 in = 504 pt = 672 CSS px
    plt.close(fig)
    assert all(size >= figures.MIN_FONT_PT for size in figures.FONT_PT.values())


def test_a_figure_too_wide_or_with_tiny_text_is_refused():
    figures.use_book_style()
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.text(0, 0, "tiny", fontsize=5)
    with pytest.raises(figures.FigureStyleError, match=r"12.00 in wide.*'tiny' \(5 pt\)"):
        figures.check_figure(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=figsize(2, 2, panel_aspect=1))
    ax.set_title("readable")
    figures.check_figure(fig)  # no error
    plt.close(fig)
