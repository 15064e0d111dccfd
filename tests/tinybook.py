"""Set-up shared by the tests that build a small book like the real one: the Chromium skip mark, the
scaffold (the real _config.yml, bibliography, Sphinx extension, static files and local MathJax) and a demo
chapter run through the runner and prepared with its appendix page (runner.run_chapter, prepare_book)."""

import shutil
from pathlib import Path

import pytest
import yaml

from atlas_core.book import runner
from atlas_core.book.browser import BrowserError, find_chromium

ROOT = Path(__file__).resolve().parents[1]

try:
    find_chromium()
    HAVE_CHROMIUM = True
except BrowserError:
    HAVE_CHROMIUM = False
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no Chromium (bash atlas.sh setup installs it)")


def book_scaffold(folder: Path) -> None:
    """The real _config.yml, references, Sphinx extensions and static files (with MathJax) in ``folder``,
    and an empty ``book/chapters/``: a tiny book needs only its pages and _toc.yml on top."""
    shutil.copy(ROOT / "_config.yml", folder / "_config.yml")
    (folder / "book" / "chapters").mkdir(parents=True)
    for name in ("references.bib", "references.md"):  # citations need the bibliography page
        shutil.copy(ROOT / "book" / name, folder / "book" / name)
    shutil.copytree(ROOT / "book" / "_ext", folder / "book" / "_ext")  # the book's Sphinx extension
    shutil.copytree(ROOT / "book" / "_static", folder / "book" / "_static",
                    ignore=shutil.ignore_patterns("mathjax"))  # its CSS and scripts
    runner.install_mathjax(folder / "book" / "_static" / "mathjax")


def demo_chapter(folder: Path, source: str, params: dict) -> None:
    """Run ``source`` (a jupytext chapter named ``demo``, model ``none``) through the runner into
    ``folder/results/none``, copy it to the book and write its appendix page (``prepare_book``)."""
    sources = folder / "notebooks"
    sources.mkdir()
    (sources / "demo.py").write_text(source)
    mp = pytest.MonkeyPatch()
    mp.setenv(runner.NOTEBOOKS_ENV, str(sources))
    try:
        executed = runner.run_chapter("demo", "none", params, folder / "results" / "none", sources / "demo.py")
        shutil.copy(executed, folder / "book" / "chapters" / "demo.ipynb")
        runner.prepare_book("none", root=folder, chapters=("demo",))
    finally:
        mp.undo()


def write_toc(folder: Path, pages: list[str]) -> None:
    """A _toc.yml with ``pages`` (paths under ``folder`` without suffix) and the appendix pages' glob."""
    toc = {"format": "jb-book", "root": "book/intro",
           "parts": [{"caption": "Chapters", "chapters": [{"file": p} for p in pages]},
                     {"caption": "Appendix", "chapters": [{"glob": f"{runner.APPENDIX_DIR.as_posix()}/*"}]}]}
    (folder / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
