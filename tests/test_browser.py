"""Browser check: a small book built like the real one (papermill, glue, -W -n, local MathJax, the
bibliography) opens in headless Chromium with every page passing; broken images, missing MathJax and
external resources are caught. The real book is checked too when its chapters have been executed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atlas_core.book import runner
from atlas_core.book.browser import (BrowserError, check_book, external_resources, find_chromium, redirect_target,
                                summary)

ROOT = Path(__file__).resolve().parents[1]

try:
    find_chromium()
    HAVE_CHROMIUM = True
except BrowserError:
    HAVE_CHROMIUM = False
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no Chromium (bash atlas.sh setup installs it)")

CHAPTER = '''# %% [markdown]
# # A glued chapter
#
# The answer is {glue:text}`demo_answer:d`, with $\\sqrt{x}$ inline as in the atlas papers
# {cite:p}`chancay2026atlas`; {numref}`fig-demo` shows it and {numref}`tbl-demo` lists it.
#
# ```{glue:figure} demo_fig
# :name: fig-demo
#
# A line that rises.
# ```
#
# ```{glue:figure} demo_table
# :name: tbl-demo
#
# The line's points.
# ```

# %% tags=["parameters"]
model = "none"
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
from atlas_core.glue import prefixed_glue

g = prefixed_glue("demo")
g("answer", 42)
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1], [0, 1])
g("fig", fig)
plt.close(fig)
import pandas as pd
g("table", pd.DataFrame({"x": [0, 1], "y": [0, 1]}))
pathlib.Path(results_dir, "demo.json").write_text(json.dumps({"answer": 42}))
'''

INTRO = """# A test book

Math on a plain page: $$E = m c^2$$

See {doc}`chapters/demo`.
"""


def jupyter_book(folder: Path, out: Path) -> subprocess.CompletedProcess:
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run([str(jb), "build", str(folder), "--path-output", str(out), "-W", "-n"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_book(tmp_path_factory):
    """A book with the real _config.yml, bibliography and local MathJax; one executed chapter."""
    folder = tmp_path_factory.mktemp("book")
    shutil.copy(ROOT / "_config.yml", folder / "_config.yml")
    (folder / "book" / "chapters").mkdir(parents=True)
    for name in ("references.bib", "references.md"):  # citations need the bibliography page
        shutil.copy(ROOT / "book" / name, folder / "book" / name)
    shutil.copytree(ROOT / "book" / "_ext", folder / "book" / "_ext")  # the book's Sphinx extension
    shutil.copytree(ROOT / "book" / "_static", folder / "book" / "_static",
                    ignore=shutil.ignore_patterns("mathjax"))  # its CSS
    runner.install_mathjax(folder / "book" / "_static" / "mathjax")
    (folder / "book" / "intro.md").write_text(INTRO)
    source = folder / "demo.py"
    source.write_text(CHAPTER)
    runner.run_chapter("demo", "none", {}, folder / "book" / "chapters", source)
    toc = {"format": "jb-book", "root": "book/intro",
           "chapters": [{"file": "book/chapters/demo"}, {"file": "book/references"}]}
    (folder / "_toc.yml").write_text(yaml.safe_dump(toc))
    built = jupyter_book(folder, folder)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return folder / "_build" / "html"


@pytest.fixture
def html_copy(small_book, tmp_path):
    """A private copy of the built HTML, safe to break."""
    return Path(shutil.copytree(small_book, tmp_path / "html"))


@needs_chromium
def test_every_page_of_a_built_book_passes(small_book):
    reports = {r.page: r for r in check_book(small_book)}
    assert not [r for r in reports.values() if r.problems], summary(list(reports.values()))
    demo = reports["book/chapters/demo.html"]
    assert demo.images == 1 and demo.glued >= 1 and demo.math >= 1
    assert reports["book/intro.html"].math >= 1


def test_glued_tables_are_numbered_as_tables(small_book):
    page = (small_book / "book" / "chapters" / "demo.html").read_text()
    assert "Fig. 1" in page and "Table 1" in page  # each counted in its own series
    assert "Fig. 2" not in page


@needs_chromium
def test_a_truncated_figure_is_caught(html_copy):
    image = next(html_copy.rglob("_images/*.png"))
    image.write_bytes(b"")
    problems = [p for r in check_book(html_copy) for p in r.problems]
    assert any("image not rendered" in p for p in problems), problems


@needs_chromium
def test_math_without_mathjax_is_caught(html_copy):
    shutil.rmtree(html_copy / "_static" / "mathjax")
    problems = [p for r in check_book(html_copy) for p in r.problems]
    assert any("MathJax did not load" in p for p in problems), problems
    assert any("not typeset" in p for p in problems), problems


@needs_chromium
def test_an_external_resource_is_caught(html_copy):
    page = html_copy / "book" / "intro.html"
    page.write_text(page.read_text().replace(
        "</head>", '<script src="https://cdn.example.org/x.js"></script></head>'))
    problems = [p for r in check_book(html_copy) for p in r.problems]
    assert any("external resource requested: https://cdn.example.org/x.js" in p for p in problems)


@needs_chromium
def test_a_redirect_is_followed_on_disk_not_in_the_browser(html_copy):
    reports = {r.page: r for r in check_book(html_copy)}
    assert reports["index.html"].problems == []  # Jupyter Book's redirect page to the intro
    (html_copy / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/gone.html" />')
    problems = [p for r in check_book(html_copy) for p in r.problems]
    assert problems == ["redirects to a missing page: book/gone.html"]


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
    from atlas_core.book.browser import Chromium

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
