"""Provenance in a built book: a small chapter glued with ``chapter_glue`` runs through the runner, its data
and appendix page are put beside it (``prepare_book``), it passes the glue checks and builds with -W -n; the
HTML has the opening box, the provenance lines with working data links, the appendix page with the code
and the parameters table; in Chromium, figures show at 100% at 1280 px and open full size on click, and a
wide table scrolls inside the text column at 1280 px and 420 px instead of running under the sidebar."""

import subprocess
import sys
from pathlib import Path

import pytest

from atlas_core.book import runner
from atlas_core.book.browser import Chromium
from tinybook import book_scaffold, demo_chapter, needs_chromium, write_toc


CHAPTER = '''# %% [markdown]
# # A provenanced chapter
#
# ```{glue:md} demo_run_box
# :format: myst
# ```
#
# {numref}`fig-demo` rises and {numref}`tbl-demo` is wide.
#
# ```{glue:figure} demo_fig
# :name: fig-demo
#
# A line that rises.
#
# {glue:md}`demo_fig_prov:myst`
# ```
#
# ```{glue:figure} demo_wide
# :name: tbl-demo
#
# Thirty columns.
#
# {glue:md}`demo_wide_prov:myst`
# ```

# %% tags=["parameters"]
model = "none"
points = 2
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
import pandas as pd
from atlas_core.figures import figsize, style
from atlas_core.glue import chapter_glue

g = chapter_glue("demo", chapter="demo", model=model, corpus="britannica", results_dir=results_dir)
line = pd.DataFrame({"x": range(points), "y": range(points)})
fig, ax = plt.subplots(figsize=figsize())
ax.plot(line.x, line.y, label="kivi", **style("kivi"))
ax.legend()
g.figure("fig", fig, data=line, sample=f"{points} points")
wide = pd.DataFrame({f"column_{i}": [1.5 * i] for i in range(30)})
g.table("wide", wide, sample="one row")
pathlib.Path(results_dir, "demo.json").write_text(json.dumps({"points": points}))
g.finish()
'''


def build_html(folder: Path) -> Path:
    """``jupyter-book build <folder> -W -n`` (warnings are errors, as in ``atlas book``); its HTML folder.
    Fails the test with the build's last output when the build fails."""
    jb = Path(sys.executable).with_name("jupyter-book")
    done = subprocess.run([str(jb), "build", str(folder), "-W", "-n"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder / "_build" / "html"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A book with the real _config.yml and static files, the demo chapter run by the runner, prepared and built."""
    folder = tmp_path_factory.mktemp("provbook")
    book_scaffold(folder)
    (folder / "book" / "intro.md").write_text("# A test book\n\nSee {doc}`chapters/demo`.\n")
    demo_chapter(folder, CHAPTER, {"points": "3"})
    runner.check_glue(folder / "book")
    write_toc(folder, ["book/chapters/demo", "book/references"])
    return build_html(folder)


def test_the_chapter_page_has_its_run_box_provenance_lines_and_data_links(built):
    html = (built / "book" / "chapters" / "demo.html").read_text()
    assert "This run" in html and "wall time" in html and "torch" in html
    assert html.count("Source: chapter") == 2
    for name in ("demo_fig.csv", "demo_wide.csv", "demo.json"):
        links = [p for p in built.glob(f"_downloads/*/{name}")]
        assert links and f"/{name}" in html, name  # the file is in the HTML and the page links it
    assert "code-demo" in html and "params-demo" in html  # links to the appendix page's labels
    assert "{download}" not in html and "{ref}" not in html  # the roles rendered, not printed


def test_the_appendix_page_shows_the_code_and_the_parameters(built):
    html = (built / "book" / "chapters" / "code" / "01-demo.html").read_text()
    assert "A provenanced chapter: code and parameters" in html
    assert "chapter_glue" in html  # the code is shown
    assert "<td><p><code class=\"docutils literal notranslate\"><span class=\"pre\">3</span></code></p></td>" in html
    assert html.count('id="fig-demo"') == 0  # the chapter's labels are not defined twice
    assert "01-demo.ipynb" in html  # the download button offers the notebook


@needs_chromium
def test_figures_show_at_full_scale_open_on_click_and_wide_tables_scroll(built):
    probe = """(() => {
      const img = document.querySelector('.bd-article figure img');
      const table = document.querySelector('.bd-article table');
      let box = table.parentElement;
      while (box && getComputedStyle(box).overflowX !== 'auto') box = box.parentElement;
      const side = document.querySelector('.bd-sidebar-secondary');
      const sideLeft = side && side.getBoundingClientRect().width > 0 ? side.getBoundingClientRect().left : innerWidth;
      const out = {scale: img.getBoundingClientRect().width / img.naturalWidth,
                   scrolls: !!box && box.scrollWidth > box.clientWidth,
                   inside: !!box && box.getBoundingClientRect().right <= Math.min(sideLeft, innerWidth) + 1};
      img.click();
      out.zoom = !!document.querySelector('.atlas-zoom img');
      return out;
    })()"""
    with Chromium() as browser:
        for width in (1280, 420):
            browser.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=900,
                         deviceScaleFactor=1, mobile=width < 600)
            browser.open((built / "book" / "chapters" / "demo.html").as_uri())
            seen = browser.evaluate(probe)
            assert seen["scrolls"] and seen["inside"] and seen["zoom"], (width, seen)
            if width == 1280:
                assert seen["scale"] > 0.99, seen  # drawn at 100%: labels at their point size
