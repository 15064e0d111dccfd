"""Browser check: a small book built like the real one (papermill, chapter_glue, -W -n, local MathJax, the
bibliography) opens in headless Chromium with every page passing but one made to break each figure and table
check (a figure without its provenance line, a data link to no file, a glued table without a caption, a figure
shrunk to 0.30, a clipped table, a table running under the sidebar at 1280 px and off the column at 420 px),
which fails with one line per problem; broken images, missing MathJax, external resources, a missing data
file or anchor and a wide table without the book's scrolling style are caught on copies of the good pages.
The checks' rules are tested on probe results without a browser too. The real book is checked when its
chapters have been executed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_core.book import runner
from atlas_core.book.browser import (PROVENANCE_MARK, TABLE_PROBE, WIDTHS, BrowserError, Chromium, check_book,
                                     external_resources, find_chromium, provenance_problems, redirect_target,
                                     scale_problems, summary, svg_width_px, table_problems)
from atlas_core.provenance import RunInfo, provenance_line
from tinybook import HAVE_CHROMIUM, book_scaffold, demo_chapter, needs_chromium, write_toc

ROOT = Path(__file__).resolve().parents[1]

CHAPTER = """# %% [markdown]
# # A glued chapter on $O_h$
#
# ```{glue:md} demo_run_box
# :format: myst
# ```
#
# The answer is {glue:text}`demo_answer:d`, with $\\sqrt{x}$ inline as in the atlas papers
# {cite:p}`chancay2026atlas`; {numref}`fig-demo` shows it and {numref}`tbl-demo` lists it.
#
# ## The figure
#
# ```{glue:figure} demo_fig
# :name: fig-demo
#
# A line that rises.
#
# {glue:md}`demo_fig_prov:myst`
# ```
#
# ## The table
#
# ```{glue:figure} demo_table
# :name: tbl-demo
#
# The line's points, thirty columns wide: it scrolls inside the column.
#
# {glue:md}`demo_table_prov:myst`
# ```

# %% tags=["parameters"]
model = "none"
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
import pandas as pd
from atlas_core.figures import figsize, style
from atlas_core.glue import chapter_glue

g = chapter_glue("demo", chapter="demo", model=model, corpus="britannica", results_dir=results_dir)
g("answer", 42)
line = pd.DataFrame({"x": [0, 1], "y": [0, 1]})
fig, ax = plt.subplots(figsize=figsize())
ax.plot(line.x, line.y, **style("kivi"))
g.figure("fig", fig, data=line, sample="2 points")
g.table("table", pd.DataFrame({f"column_{i}": [1.5 * i] for i in range(30)}), sample="one row")
pathlib.Path(results_dir, "demo.json").write_text(json.dumps({"answer": 42}))
g.finish()
"""

INTRO = """# A test book

Math on a plain page: $$E = m c^2$$

See {doc}`chapters/demo`.
"""

WIDE_ROW = "<tr>" + "".join(f"<td>column_{i}&nbsp;value</td>" for i in range(30)) + "</tr>"
# One page that breaks each check of figures and tables once: its problems are listed in BAD_PAGE_PROBLEMS.
BAD_PAGE = f"""# A page that breaks each check

## A figure without its provenance line

```{{figure}} narrow.svg
:name: fig-bare

A figure with a caption and nothing under it.
```

## A provenance line whose data link leads nowhere

```{{figure}} narrow.svg
:name: fig-lost

The same figure.

Source: chapter *demo*, model `none`; data <a download="" href="../_downloads/gone/demo_gone.csv">demo_gone.csv</a>.
```

## A figure drawn smaller than it was made

```{{figure}} wide.svg
:name: fig-shrunk
:width: 300px

A figure 1,000 px wide drawn at 300 px.

Source: chapter *demo*, model `none`; data {{download}}`wide.csv <wide.csv>`.
```

## A glued table without a caption

```{{glue}} demo_table
:doc: chapters/demo.ipynb
```

## A table clipped by a box that does not scroll

<div style="overflow-x: hidden"><table id="clipped">{WIDE_ROW}</table></div>

## A table that runs out of the column

<table id="loose">{WIDE_ROW}</table>
"""
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="{pt}pt" height="150pt"><rect width="100%" height="100%"/></svg>'
BAD_PAGE_PROBLEMS = (  # regular expressions, each matching one problem of book/bad.html
    r"Fig\. \d+ has no provenance line under its caption",
    r"glued table 1 outside a figure has no provenance line under its caption",
    (r"Fig\. \d+: provenance link 'demo_gone\.csv' does not resolve: _downloads/gone/demo_gone\.csv is not in the "
     r"built HTML"),
    r"Fig\. \d+ drawn at 0\.30 of its natural width at 1280 px \(300 of 1000 px\): its labels shrink with it",
    (r"table 2 \(#clipped\) clipped at 1280 px: \d+ px wide in a \d+ px <div> that does not scroll "
     r"\(overflow-x: hidden\)"),
    (r"table 2 \(#clipped\) clipped at 420 px: \d+ px wide in a \d+ px <div> that does not scroll "
     r"\(overflow-x: hidden\)"),
    (r"table 3 \(#loose\) runs under the right-hand contents sidebar at 1280 px: it ends at \d+ px, the column at "
     r"\d+ px"),
    r"table 3 \(#loose\) runs past the text column at 420 px: it ends at \d+ px, the column at \d+ px",
)


def jupyter_book(folder: Path, out: Path) -> subprocess.CompletedProcess:
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", str(folder), "--path-output", str(out), "-W", "-n"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_book(tmp_path_factory):
    """A book built like the real one (its _config.yml, bibliography, static files and local MathJax): a
    chapter run through the runner with chapter_glue (run box, provenance lines, data files, appendix page)
    that passes every check, and a page (book/bad.md) that breaks each figure and table check once."""
    folder = tmp_path_factory.mktemp("book")
    book_scaffold(folder)
    (folder / "book" / "intro.md").write_text(INTRO)
    (folder / "book" / "bad.md").write_text(BAD_PAGE)
    (folder / "book" / "wide.svg").write_text(SVG.format(pt=750))  # 1,000 CSS px
    (folder / "book" / "narrow.svg").write_text(SVG.format(pt=150))
    (folder / "book" / "wide.csv").write_text("x,y\n0,0\n")
    demo_chapter(folder, CHAPTER, {})
    write_toc(folder, ["book/chapters/demo", "book/bad", "book/references"])
    built = jupyter_book(folder, folder)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return folder / "_build" / "html"


@pytest.fixture(scope="module")
def reports(small_book):
    """The browser check of the small book, page → report."""
    if not HAVE_CHROMIUM:
        pytest.skip("no Chromium (bash atlas.sh setup installs it)")
    return {r.page: r for r in check_book(small_book)}


@pytest.fixture
def html_copy(small_book, tmp_path):
    """A private copy of the built HTML, safe to break."""
    return Path(shutil.copytree(small_book, tmp_path / "html"))


def good_problems(html: Path) -> list[str]:
    """The problems the browser check finds on every page but the bad one."""
    return [p for r in check_book(html) if r.page != BAD for p in r.problems]


BAD = "book/bad.html"


@needs_chromium
def test_every_page_but_the_bad_one_passes(reports):
    assert not [r for p, r in reports.items() if r.problems and p != BAD], summary(list(reports.values()))
    demo = reports["book/chapters/demo.html"]
    assert demo.images == 1 and demo.glued >= 1 and demo.math >= 1
    assert demo.figures == 2 and demo.tables == 1  # the figure and the glued table, each with its line
    assert reports["book/intro.html"].math >= 1
    # the chapter's title has math, shown in the contents sidebar of every page: typeset on a page without
    # math of its own too (Sphinx loads MathJax only where the body has math, unless atlas_offline says always)
    assert reports["book/references.html"].math >= 1


@needs_chromium
def test_the_bad_page_fails_each_figure_and_table_check_with_its_message(reports):
    problems = reports[BAD].problems
    for pattern in BAD_PAGE_PROBLEMS:
        assert sum(bool(re.fullmatch(pattern, p)) for p in problems) == 1, (pattern, problems)
    assert len(problems) == len(BAD_PAGE_PROBLEMS), problems  # nothing else
    assert "1 pages with problems" in summary(list(reports.values()))
    assert f"  {BAD}: {problems[0]}" in summary(list(reports.values()))  # one line per problem, under its page


@needs_chromium
def test_the_good_chapter_is_laid_out_as_the_checks_assume(small_book):
    """The good page really exercises the checks: at 1280 px its contents sidebar is shown (the edge a wide
    table must not pass) and its wide table is wider than the column, inside a box that scrolls."""
    with Chromium() as browser:
        browser.set_width(1280)
        browser.open((small_book / "book" / "chapters" / "demo.html").as_uri())
        seen = browser.evaluate(TABLE_PROBE)
    assert seen["sidebar"] is not None and seen["edge"] <= seen["sidebar"]
    (table,) = seen["tables"]
    assert table["scrolls"] and table["width"] > seen["edge"] - 300 and table["right"] <= seen["edge"]


@needs_chromium
def test_a_missing_data_file_is_caught(html_copy):
    page = html_copy / "book" / "chapters" / "demo.html"
    (csv,) = html_copy.glob("_downloads/*/demo_fig.csv")
    csv.unlink()
    problems = good_problems(html_copy)
    assert problems == [f"Fig. 1: provenance link 'demo_fig.csv' does not resolve: {csv.relative_to(html_copy)} is "
                        "not in the built HTML"], problems
    assert page.exists()


@needs_chromium
def test_a_provenance_link_to_a_missing_anchor_is_caught(html_copy):
    page = html_copy / "book" / "chapters" / "demo.html"
    page.write_text(page.read_text().replace("#params-demo", "#params-gone"))
    problems = good_problems(html_copy)
    assert sorted(problems) == sorted(f"{n}: provenance link 'parameters' points to a missing anchor: "
                                      "book/chapters/code/01-demo.html#params-gone" for n in ("Fig. 1", "Table 1"))


@needs_chromium
def test_a_wide_table_without_the_books_scrolling_style_is_caught(html_copy):
    css = html_copy / "_static" / "atlas.css"
    assert css.read_text().count("overflow-x: auto") == 1
    css.write_text(css.read_text().replace("overflow-x: auto", "overflow-x: visible"))
    problems = good_problems(html_copy)
    assert len(problems) == 2, problems
    assert re.fullmatch(r"Table 1 runs under the right-hand contents sidebar at 1280 px: it ends at \d+ px, the "
                        r"column at \d+ px", problems[0]), problems
    assert re.fullmatch(r"Table 1 runs past the text column at 420 px: it ends at \d+ px, the column at \d+ px",
                        problems[1]), problems


@needs_chromium
def test_only_pages_with_tables_are_loaded_again_at_the_phone_width(small_book, monkeypatch):
    opened = []
    real_open = Chromium.open
    monkeypatch.setattr(Chromium, "open", lambda self, url: opened.append(url) or real_open(self, url))
    widths = []
    real_width = Chromium.set_width
    monkeypatch.setattr(Chromium, "set_width", lambda self, w: widths.append(w) or real_width(self, w))
    reports = check_book(small_book)
    with_tables = {r.page for r in reports if r.tables}
    assert widths == list(WIDTHS)  # the viewport is set once per width
    assert with_tables >= {"book/chapters/demo.html", BAD}
    for report in reports:
        loads = sum(url.endswith("/" + report.page) for url in opened)
        assert loads == (0 if report.page == "index.html" else 2 if report.page in with_tables else 1), report.page


def test_glued_tables_are_numbered_as_tables(small_book):
    page = (small_book / "book" / "chapters" / "demo.html").read_text()
    assert "Fig. 1" in page and "Table 1" in page  # each counted in its own series
    assert "Fig. 2" not in page


@needs_chromium
def test_a_truncated_figure_is_caught(html_copy):
    image = html_copy / "_images" / re.search(r'src="../../_images/([^"]+)"',
                                              (html_copy / "book" / "chapters" / "demo.html").read_text()).group(1)
    image.write_bytes(b"")
    problems = good_problems(html_copy)
    assert any("image not rendered" in p for p in problems), problems


@needs_chromium
def test_math_without_mathjax_is_caught(html_copy):
    shutil.rmtree(html_copy / "_static" / "mathjax")
    problems = good_problems(html_copy)
    assert any("MathJax did not load" in p for p in problems), problems
    assert any("not typeset" in p for p in problems), problems


@needs_chromium
def test_an_external_resource_is_caught(html_copy):
    page = html_copy / "book" / "intro.html"
    page.write_text(page.read_text().replace(
        "</head>", '<script src="https://cdn.example.org/x.js"></script></head>'))
    problems = good_problems(html_copy)
    assert any("external resource requested: https://cdn.example.org/x.js" in p for p in problems)


@needs_chromium
def test_a_redirect_is_followed_on_disk_not_in_the_browser(html_copy):
    reports = {r.page: r for r in check_book(html_copy)}
    assert reports["index.html"].problems == []  # Jupyter Book's redirect page to the intro
    (html_copy / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/gone.html" />')
    assert good_problems(html_copy) == ["redirects to a missing page: book/gone.html"]


# --- the figure and table checks on what the probes report (no browser) --------------------------------

def test_the_provenance_mark_is_how_provenance_lines_begin():
    info = RunInfo(commit="0" * 40, dirty=False, versions={}, python="3", cpu="cpu", cores=1, threads=1, gpu=None,
                   date="2026-01-01T00:00")
    line = provenance_line(info, chapter="c", key="c_fig", model="m", corpus="britannica", sample="2 points")
    assert line.startswith(PROVENANCE_MARK) and ", corpus britannica, 2 points;" in line
    keys = provenance_line(info, chapter="c", key="c_fig", model="m", corpus="no corpus (random keys)", sample="2 points")
    assert ", no corpus (random keys), 2 points;" in keys and "corpus no corpus" not in keys


@pytest.mark.parametrize("svg, px", [
    ('<svg xmlns="x" width="432pt" height="10pt">', 576.0),  # matplotlib writes points
    ('<?xml version="1.0"?>\n<svg stroke-width="3" width="200" height="10">', 200.0),
    ('<svg width="2in">', 192.0), ('<svg width="10mm">', 96 / 2.54), ('<svg width="300px">', 300.0),
    ('<svg width="100%">', None), ('<svg viewBox="0 0 10 10">', None), ('<html width="5">', None),
])
def test_an_svg_width_is_read_in_css_pixels(svg, px):
    assert svg_width_px(svg) == (pytest.approx(px) if px is not None else None)


def figure(name="Fig. 1", data=("file:///h/_downloads/a/f.csv",), links=None, images=()):
    links = [{"text": "f.csv", "href": h} for h in data] if links is None else links
    return {"name": name, "provenance": {"data": list(data), "links": links}, "images": list(images)}


def test_provenance_lines_need_a_data_link_that_resolves(tmp_path):
    html = tmp_path.resolve()
    (html / "_downloads" / "a").mkdir(parents=True)
    (html / "_downloads" / "a" / "f.csv").write_text("x\n1\n")
    (html / "code.html").write_text('<p id="params-c">x</p>')
    ok = html.as_uri()
    assert provenance_problems([figure(data=(f"{ok}/_downloads/a/f.csv",),
                                       links=[{"text": "f.csv", "href": f"{ok}/_downloads/a/f.csv"},
                                              {"text": "parameters", "href": f"{ok}/code.html#params-c"},
                                              {"text": "doi", "href": "https://doi.org/10.1/x"}])], html) == []
    assert provenance_problems([{"name": "Table 2", "provenance": None, "images": []}], html) == [
        "Table 2 has no provenance line under its caption"]
    assert provenance_problems([figure(data=(), links=[])], html) == ["Fig. 1: its provenance line has no data link"]
    assert provenance_problems([figure(data=(f"{ok}/_downloads/b/g%20h.csv",))], html) == [
        "Fig. 1: provenance link 'f.csv' does not resolve: _downloads/b/g h.csv is not in the built HTML"]
    assert provenance_problems([figure(links=[{"text": "code", "href": f"{ok}/code.html#code-c"}])], html) == [
        "Fig. 1: provenance link 'code' points to a missing anchor: code.html#code-c"]
    outside = (tmp_path / "..").resolve().as_uri() + "/elsewhere.csv"
    assert provenance_problems([figure(data=(outside,))], html) == [
        f"Fig. 1: provenance link 'f.csv' points outside the built HTML: {(tmp_path / '..').resolve()}/elsewhere.csv"]


def test_a_figure_drawn_below_nine_tenths_of_its_width_is_reported(tmp_path):
    svg = tmp_path / "f.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="432pt" height="216pt">')  # 576 px
    drawn = {"name": "Fig. 3", "provenance": None,
             "images": [{"src": svg.as_uri(), "natural": 300, "drawn": 0.89 * 576}]}  # the attribute wins
    assert scale_problems([drawn], 1280) == [
        "Fig. 3 drawn at 0.89 of its natural width at 1280 px (513 of 576 px): its labels shrink with it"]
    drawn["images"][0]["drawn"] = 0.9 * 576
    assert scale_problems([drawn], 1280) == []
    png = {"name": "Fig. 4", "images": [{"src": "file:///x.png", "natural": 1000, "drawn": 550}]}
    assert scale_problems([png], 1280) == [
        "Fig. 4 drawn at 0.55 of its natural width at 1280 px (550 of 1000 px): its labels shrink with it"]
    broken = {"name": "Fig. 5", "images": [{"src": "file:///y.png", "natural": 0, "drawn": 40}]}
    assert scale_problems([broken], 1280) == []  # reported as not rendered by the page check


def table(name="Table 1", right=700, scrolls=False, clipper=None, width=600):
    return {"name": name, "width": width, "right": right, "scrolls": scrolls, "clipper": clipper}


def test_a_table_must_fit_or_scroll_inside_the_column():
    page = {"edge": 1000, "sidebar": 1010}
    fits = [table(), table(right=1001), table(scrolls=True, width=1600, right=990)]
    assert table_problems({**page, "tables": fits}, 1280) == []
    clipped = table(width=1600, clipper={"box": "div", "width": 700, "overflow": "hidden"})
    assert table_problems({**page, "tables": [clipped]}, 1280) == [
        "Table 1 clipped at 1280 px: 1600 px wide in a 700 px <div> that does not scroll (overflow-x: hidden)"]
    assert table_problems({**page, "tables": [table(right=1400)]}, 1280) == [
        "Table 1 runs under the right-hand contents sidebar at 1280 px: it ends at 1400 px, the column at 1000 px"]
    assert table_problems({**page, "tables": [table(right=1005, scrolls=True)]}, 1280) == [
        "Table 1 runs past the text column at 1280 px: its scrolling box ends at 1005 px, the column at 1000 px"]
    assert table_problems({"edge": 404, "sidebar": None, "tables": [table(right=900)]}, 420) == [
        "Table 1 runs past the text column at 420 px: it ends at 900 px, the column at 404 px"]


def test_redirect_targets_are_read_from_meta_refresh():
    assert redirect_target('<meta http-equiv="Refresh" content="0; url=book/intro.html" />') == "book/intro.html"
    assert redirect_target("<html><body>a page</body></html>") is None


def test_a_folder_without_pages_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the book first"):
        check_book(tmp_path)


def test_a_missing_chromium_says_what_to_install(monkeypatch):
    monkeypatch.setenv("ATLAS_CHROMIUM", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BrowserError, match="apt-get install chromium"):
        find_chromium()


@pytest.mark.slow
@needs_chromium
@pytest.mark.skipif(not all((ROOT / "book" / "chapters" / f"{c}.ipynb").exists() for c in runner.CHAPTERS),
                    reason="the chapters have not been executed (bash atlas.sh book)")
def test_the_real_book_builds_and_passes(tmp_path):
    built = jupyter_book(ROOT, tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    reports = check_book(tmp_path / "_build" / "html")
    assert not [r for r in reports if r.problems], summary(reports)
    assert sum(r.images for r in reports) >= len(runner.CHAPTERS)


def test_external_resources_are_found_in_tags_and_inline_scripts():
    html = ('<link rel="stylesheet" href="https://cdn.example.org/a.css">'
            '<script src="//cdn.example.org/b.js"></script><img src="_images/c.png">'
            '<script>const URL = "https://unpkg.com/x/index.js";</script>'
            '<a href="https://doi.org/10.1/xyz">a citation</a><script src="_static/d.js"></script>')
    assert external_resources(html) == ["https://cdn.example.org/a.css", "//cdn.example.org/b.js",
                                        "https://unpkg.com/x/index.js"]


@needs_chromium
def test_the_session_evaluates_scripts_and_prints_pdf(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><title>T</title></head><body><p>printed words</p></body></html>")
    with Chromium() as browser:
        browser.open(page.as_uri())
        assert browser.evaluate("1 + 1") == 2
        assert browser.evaluate("new Promise(r => setTimeout(() => r(document.title), 10))") == "T"  # awaited
        with pytest.raises(BrowserError, match="my check failed: .*boom"):
            browser.evaluate("(() => { throw new Error('boom'); })()", "my check")
        data = browser.print_pdf(paperWidth=4.0, paperHeight=3.0)
    assert data.startswith(b"%PDF")
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1 and "printed words" in reader.pages[0].extract_text()
    assert float(reader.pages[0].mediabox.width) == pytest.approx(4.0 * 72, abs=1)  # the paper size asked for


def test_a_folder_that_is_not_a_built_book_is_refused_before_any_page_opens(tmp_path):
    """A folder of other HTML (/tmp, a home folder) is not the book: one line, no browser started."""
    (tmp_path / "index.html").write_text("<html><body><p>hello</p></body></html>")
    with pytest.raises(FileNotFoundError, match=r"not a built book \(no Sphinx \.buildinfo there\)"):
        check_book(tmp_path, executable="/no/such/chromium")  # would fail differently if it got that far
