"""The book's glue checks, run before the HTML build: every key a page glues was produced by a chapter and is
not an empty text, and every glued figure or table the pages show has its data file beside it.

Myst-nb only warns about a missing key, deep inside a long build log; these checks name the page and the
key in one line, in a second, before Jupyter Book starts.

Pages are the book's Markdown files and the notebooks under ``book/chapters/`` at any depth (their Markdown
cells): the chapters, and the per-model copies of ``atlas book --models`` (``model_runs``). A reference is
``{glue…}`key``` or ``{glue…}`x.ipynb::key``` (a role), or a ``{glue…} key`` directive. A chapter's glued values are the outputs its executed notebook recorded (``scrapbook`` metadata);
a figure or table is a glued output holding an image or an HTML table; its data file is
``book/chapters/<provenance.data_path(chapter, key)>`` (any suffix).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from atlas_core import provenance

GLUE_ROLE = re.compile(r"\{glue(?::[a-z]*)?\}`([^`]+)`")
GLUE_DIRECTIVE = re.compile(r"(?:```|:::)\{glue(?::[a-z]*)?\}[ \t]+(\S+)")
RECORD_PREFIX = "application/papermill.record/"  # how myst-nb stores a glued value that is not displayed
FIGURE_MIMES = ("image/svg+xml", "image/png", "image/jpeg")


def references(text: str) -> list[tuple[str | None, str]]:
    """(notebook, key) of every glue reference in MyST text, in order; notebook is the ``x.ipynb`` before
    ``::`` (another document's value), None for the page's own notebook."""
    found = []
    for target in GLUE_ROLE.findall(text) + GLUE_DIRECTIVE.findall(text):
        path, sep, rest = target.rpartition("::")
        found.append((path or None, (rest if sep else target).split(":")[0]))
    return found


def glued_outputs(notebook: Path) -> dict[str, dict]:
    """Key → mime bundle (prefixes removed) of every value an executed notebook glued."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    found = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                found[name] = {m.removeprefix(RECORD_PREFIX): v for m, v in out.get("data", {}).items()}
    return found


def is_figure_or_table(bundle: dict) -> bool:
    """True for a glued image or an HTML table (a DataFrame or Styler)."""
    html = bundle.get("text/html", "")
    html = "".join(html) if isinstance(html, list) else html
    return any(m in bundle for m in FIGURE_MIMES) or "<table" in html


def is_empty_text(bundle: dict) -> bool:
    """True for a glued empty text: the page shows nothing where a sentence or number was glued, which reads
    as a missing value (a conditional sentence glued as "" in one case). A value shown as "nan" is the
    browser check's to find on the rendered page (``browser.MISSING_VALUES``): toy runs glue NaN by design."""
    if set(bundle) - {"text/plain"}:  # HTML, Markdown or an image: shown as such
        return False
    text = bundle.get("text/plain", "")
    text = ("".join(text) if isinstance(text, list) else text).strip()
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and not text[1:-1].strip()  # a str's repr


def _pages(book: Path) -> list[tuple[Path, str, Path | None]]:
    """(page, its MyST text, its own notebook or None) for the book's Markdown pages and chapter notebooks."""
    pages = [(p, p.read_text(encoding="utf-8"), None) for p in sorted(book.rglob("*.md"))
             if "_build" not in p.parts and "_static" not in p.parts]
    for nb in sorted(p for p in (book / "chapters").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts):
        cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
        text = "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                         for c in cells if c.get("cell_type") == "markdown")
        pages.append((nb, text, nb))
    return pages


def glue_problems(book: Path) -> list[str]:
    """One line per problem: a page glues a key no chapter produced (or names a notebook that does not
    exist), an empty text (``is_empty_text``), or a glued figure or table that has no data file beside it.

    Args:
        book: the book's source folder (``book/``), with the executed chapters in ``book/chapters/``.

    Returns:
        Problems as "page: reason" lines, relative to ``book``'s parent; empty when the book is consistent.
    """
    book = Path(book)
    cache: dict[Path, dict[str, dict] | None] = {}

    def outputs(nb: Path) -> dict[str, dict] | None:
        if nb not in cache:
            cache[nb] = glued_outputs(nb) if nb.exists() else None
        return cache[nb]

    problems, seen = [], set()
    for page, text, own in _pages(book):
        where = page.relative_to(book.parent)
        for notebook, key in references(text):
            nb = (page.parent / notebook).resolve() if notebook else own
            if nb is None:
                problems.append(f"{where}: glues {key!r} without naming a chapter notebook (x.ipynb::{key})")
                continue
            glued = outputs(nb)
            if glued is None:
                problems.append(f"{where}: glues {key!r} from {notebook}, which no chapter produced (no such notebook)")
            elif key not in glued:
                problems.append(f"{where}: glues {key!r}, which chapter {nb.stem!r} did not produce")
            elif is_empty_text(glued[key]):
                problems.append(f"{where}: glues {key!r}, which chapter {nb.stem!r} produced as {glued[key]['text/plain']!r}: "
                                f"an empty text shows as nothing on the page (glue a sentence, or \"—\", in every case)")
            elif is_figure_or_table(glued[key]) and (nb, key) not in seen:
                seen.add((nb, key))
                data = nb.parent / provenance.data_path(nb.stem, key)
                if not any(data.parent.glob(f"{data.stem}.*")):
                    problems.append(f"{where}: glued figure or table {key!r} has no data file "
                                    f"({data.relative_to(book.parent)}; glue it with g.figure / g.table)")
    return problems
