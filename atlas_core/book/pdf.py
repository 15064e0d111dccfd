"""The whole book as one PDF, printed offline by the headless Chromium of the browser check, and checked.

Every page of ``_toc.yml`` (the root page, then each ``file`` and ``glob`` entry in order, part captions
kept) is opened in Chromium (:class:`atlas_core.book.browser.Chromium`), which waits until MathJax has typeset
the page, the images have decoded and the web fonts have loaded; a print stylesheet (:data:`PRINT_CSS`) hides
the theme's navigation, sidebars and search, anything wider than the paper's text column (a wide table) is
scaled to fit, and the page is printed with DevTools ``Page.printToPDF`` (images at their own resolution,
a tagged PDF, the page title in the header). Once every page's length is known, a contents page
with each page's first page number is printed, then one numbering layer ("n / N" in the footer, printed
by Chromium itself), and :mod:`pypdf` merges them: contents, pages, numbers laid over every page, one
bookmark per page under its part. Links between the book's pages (``file:`` addresses into this machine's
build folder, as printed) become links inside the PDF; links to the web (a citation's DOI) stay.

:func:`check_pdf` reads the written file back and lists what a reader would miss: pages, numbering, the
contents, extractable text, each page's title, every figure and table caption number, every figure drawn
(SVG included), every raster figure at its full pixel size, nothing cut at the margin.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import yaml

from atlas_core.book.runner import ROOT, RunnerError, html_digest
from atlas_core.cache import atomic_path

PDF_NAME = "book.pdf"  # under <build>/pdf/, beside <build>/html/ (Jupyter Book's own PDF builders use this name)
STAMP_NAME = ".atlas-pdf-inputs"  # beside the PDF: the digest of the HTML (and of this printer) it was made from
# A4 in inches; the top and bottom margins hold the header (page title) and the footer (page number).
PAPER = {"paperWidth": 8.27, "paperHeight": 11.69, "marginTop": 0.75, "marginBottom": 0.75,
         "marginLeft": 0.7, "marginRight": 0.7}
COLUMN_PX = round((PAPER["paperWidth"] - PAPER["marginLeft"] - PAPER["marginRight"]) * 96)  # CSS px
PRINT_TIMEOUT_S = 300.0  # one DevTools call; the longest chapter pages take seconds to print
MAX_CONTENTS_ROUNDS = 4  # the contents page is printed until its own length stops changing

# The theme's chrome that means nothing on paper: header bar, sidebars (book contents, page contents),
# search, buttons, previous/next links, footer; the article takes the whole width.
PRINT_CSS = """
@media print {
  .bd-header, .bd-header-article, .header-article, .bd-sidebar-primary, .bd-sidebar-secondary, .bd-sidebar,
  .bd-footer, .bd-footer-article, .bd-footer-content, .prev-next-area, .prev-next-footer, .bd-search,
  .search-button, .search-button-field, .theme-switch-button, .sidebar-toggle, .skip-link, #pst-back-to-top,
  .headerlink, .toggle-button, .copybtn, .bd-header-announcement { display: none !important; }
  html, body, .bd-page-width, .bd-container, .bd-container__inner, .bd-main, .bd-content, .bd-article-container,
  .bd-article { max-width: none !important; width: auto !important; min-width: 0 !important; margin: 0 !important;
                padding: 0 !important; }
  body { font-size: 10pt; background: white !important; }
  img { max-width: 100% !important; height: auto !important; }
  figure, img, table, .math, .admonition, pre { break-inside: avoid; }
  h1, h2, h3, h4, figcaption, .caption { break-after: avoid; }
  table { font-size: 8pt; }
  .table-wrapper, .pst-scrollable-table-container, div.cell_output, .output { overflow: visible !important; }
  pre { white-space: pre-wrap; }
  /* A prose table of many columns (the findings box, the claims page: PRINT_PREPARE marks them) prints each
     row as a block, every cell under its column's name: in a portrait column its six narrow columns ran
     fourteen pages of a few words per line. */
  table.atlas-stacked, table.atlas-stacked tbody, table.atlas-stacked tr, table.atlas-stacked td { display: block; }
  table.atlas-stacked thead { display: none; }
  table.atlas-stacked tr { break-inside: avoid; border-top: 1px solid #999; padding: 0.3em 0; }
  table.atlas-stacked td { border: none !important; padding: 0.05em 0 !important; text-align: left !important; }
  table.atlas-stacked td::before { content: attr(data-label) ": "; font-weight: bold; }
  table.atlas-stacked { font-size: 9pt; break-inside: auto; }
  /* its caption as a plain block kept with the first row: as a table caption it stood alone on a page */
  table.atlas-stacked caption { display: block; text-align: left; break-after: avoid; }
  /* and the first row kept with the caption from the other side too: "avoid" after the caption alone let the
     findings box's heading and caption end page 2 with its first row on page 3 */
  table.atlas-stacked tbody, table.atlas-stacked tr:first-child { break-before: avoid; }
  .admonition:has(table.atlas-stacked) > p { break-after: avoid; break-inside: avoid; }
  div:has(> table.atlas-stacked) { break-before: avoid; }
  /* nor may a box around it keep it whole: the findings box, taller than a page, left its first paragraph
     alone on a page and began the table on the next */
  div:has(table.atlas-stacked), figure:has(table.atlas-stacked) { break-inside: auto !important; }
}
"""
# A markdown table prints as stacked rows when it has at least this many columns and its cells hold prose (this
# many characters on average): the findings box and the claims page, not a table of numbers.
STACKED = {"columns": 4, "chars": 25}

# Runs in each page after the browser check's probe (MathJax typeset, images decoded): the print
# stylesheet and the light theme applied, every image loaded eagerly, fonts loaded; a table, code block or
# displayed equation wider than the text column is scaled down to fit (CSS zoom; on paper it would be cut
# at the margin); then what the PDF must hold (read under print media, the viewport as wide as the
# printed column: only what will be printed, as it will be laid out).
PRINT_PREPARE = """
(async (css, stacked) => {
  document.documentElement.dataset.theme = 'light';
  document.documentElement.dataset.mode = 'light';
  const style = document.createElement('style');
  style.textContent = css;
  document.head.appendChild(style);
  // Prose tables (markdown tables, not the glued DataFrames, whose ids pandas sets) of many columns print
  // as stacked rows: each cell labelled with its column's name (PRINT_CSS).
  document.querySelectorAll('table').forEach(t => {
    const heads = Array.from(t.querySelectorAll('thead th')).map(th => th.textContent.trim());
    const cells = Array.from(t.querySelectorAll('tbody td')).map(td => td.textContent.trim().length);
    const prose = cells.length && cells.reduce((a, b) => a + b, 0) / cells.length >= stacked.chars;
    if (t.id || heads.length < stacked.columns || !prose) return;
    t.classList.add('atlas-stacked');
    t.querySelectorAll('tbody tr').forEach(tr => Array.from(tr.children).forEach((td, i) => {
      td.dataset.label = heads[i] || ''; }));
  });
  const images = Array.from(document.images);
  images.forEach(i => { i.loading = 'eager'; });
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await document.fonts.ready;
  const main = document.querySelector('article.bd-article, main, body');
  const shown = e => e.getClientRects().length > 0;
  const room = document.documentElement.clientWidth;  // the viewport: as wide as the paper's text column
  const wide = () => {
    const over = Array.from(main.querySelectorAll('table, pre, mjx-container[display="true"], img, svg'))
                   .filter(e => shown(e) && e.getBoundingClientRect().right > room + 1);
    return over.filter(e => !over.some(o => o !== e && o.contains(e)));  // the outermost: zoom scales the rest
  };
  const scaled = wide();
  for (let round = 0; round < 4; round++) {  // borders and text hinting do not scale exactly: refine
    wide().forEach(e => { const box = e.getBoundingClientRect();
                          const zoom = (parseFloat(e.style.zoom) || 1) * (room - Math.max(box.left, 0)) / box.width;
                          e.style.zoom = (0.995 * zoom).toFixed(4); });
  }
  const h1 = main.querySelector('h1');
  const title = h1 ? Array.from(h1.childNodes).filter(n => !(n.classList && n.classList.contains('headerlink')))
                          .map(n => n.textContent).join('').trim() : document.title;
  return {
    title: title,
    images: Array.from(main.querySelectorAll('img')).filter(shown)
               .map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth, height: i.naturalHeight})),
    scaled: scaled.length,
    too_wide: wide().map(e => `${e.tagName.toLowerCase()} "${e.textContent.trim().slice(0, 40)}"`),
    captions: Array.from(main.querySelectorAll('.caption-number')).filter(shown)
               .map(e => e.textContent.trim()),
  };
})
"""

CONTENTS_CSS = """
body { font-family: serif; font-size: 11pt; }
h1 { font-size: 20pt; margin: 0 0 0.3em; }
h2 { font-size: 14pt; margin: 1.2em 0 0.6em; }
.part { font-weight: bold; margin: 1em 0 0.3em; }
.entry { display: flex; align-items: baseline; margin: 0.2em 0; }
.entry .name { padding-right: 0.4em; }
.entry .dots { flex: 1; border-bottom: 1px dotted #666; }
.entry .page { padding-left: 0.4em; }
"""


class PdfError(RunnerError):
    """The book's PDF could not be printed, or the written PDF failed its check (the message says why)."""


@dataclass(frozen=True, kw_only=True)
class TocEntry:
    """One page of the book, in table-of-contents order.

    Attributes:
        file: the source path without suffix, relative to the book root (``book/chapters/nqp``).
        part: the caption of the part it belongs to ("" for the root page and pages outside a part).
    """

    file: str
    part: str = ""

    def html(self, html_dir: Path) -> Path:
        """The built page of this entry under ``html_dir``."""
        return html_dir / f"{self.file}.html"


@dataclass(frozen=True, kw_only=True)
class PrintedPage:
    """One book page as printed.

    Attributes:
        entry: its place in the table of contents.
        title: its first heading (section number included), as the contents page lists it.
        pdf_pages: how many PDF pages it printed to (≥ 1).
        header: the running header printed on each of its PDF pages.
        images: how many images (``<img>``: raster and SVG figures) its article shows.
        raster: ``(width, height)`` in pixels of each raster image among them (SVG prints as vectors).
        captions: the caption numbers shown on it ("Fig. 2", "Table 1"), in page order.
        scaled: wide elements (tables, code, displayed equations) scaled down to the text column.
        too_wide: elements still wider than the column once scaled (cut on paper; a check problem).
    """

    entry: TocEntry
    title: str
    pdf_pages: int
    header: str = ""
    images: int = 0
    raster: tuple[tuple[int, int], ...] = ()
    captions: tuple[str, ...] = ()
    scaled: int = 0
    too_wide: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BookPdf:
    """A written PDF of the book and what went into it.

    Attributes:
        path: the PDF file.
        pages: the printed pages, in book order.
        contents_pages: PDF pages taken by the contents (they come first).
    """

    path: Path
    pages: tuple[PrintedPage, ...]
    contents_pages: int

    @property
    def total_pages(self) -> int:
        """PDF pages the file should hold: the contents plus every printed page."""
        return self.contents_pages + sum(p.pdf_pages for p in self.pages)

    def starts(self) -> list[int]:
        """The 1-based PDF page number on which each printed page begins."""
        return page_starts([p.pdf_pages for p in self.pages], self.contents_pages)


def toc_entries(toc: Path | str) -> tuple[TocEntry, ...]:
    """Every page of a Jupyter Book ``_toc.yml`` in reading order: the root, then each ``file`` entry
    (nested ``sections`` after their parent) and the pages each ``glob`` entry matches (sorted by name, as
    Jupyter Book lists them; pages listed elsewhere left out), each with the caption of its part.

    Raises:
        FileNotFoundError: ``toc`` does not exist.
        ValueError: it names no root page.
    """
    toc = Path(toc)
    data = yaml.safe_load(toc.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not data.get("root"):
        raise ValueError(f"{toc}: no 'root' page in the table of contents")
    found = [TocEntry(file=_stem(data["root"]))]
    listed = set(_listed(data))

    def walk(node, part: str) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, part)
        elif isinstance(node, dict):
            part = str(node.get("caption", part)) if "caption" in node and "file" not in node else part
            if node.get("file"):
                found.append(TocEntry(file=_stem(node["file"]), part=part))
            if node.get("glob"):
                matched = _glob(toc.parent, str(node["glob"]))
                found.extend(TocEntry(file=f, part=part) for f in matched if f not in listed)
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key), part)

    walk({k: v for k, v in data.items() if k in ("parts", "chapters", "sections")}, "")
    return tuple(found)


SOURCE_SUFFIXES = (".md", ".ipynb", ".rst")  # the page sources a glob entry matches


def _listed(node) -> list[str]:
    """Every page a toc names explicitly (``root`` and ``file`` entries)."""
    if isinstance(node, list):
        return [f for item in node for f in _listed(item)]
    if isinstance(node, dict):
        own = [_stem(node[k]) for k in ("root", "file") if node.get(k)]
        return own + [f for v in node.values() if isinstance(v, (list, dict)) for f in _listed(v)]
    return []


def _glob(root: Path, pattern: str) -> list[str]:
    """The pages (source files, suffix dropped, relative to ``root``) a toc ``glob`` pattern matches, sorted."""
    return sorted({_stem(str(path.relative_to(root))) for path in root.glob(pattern)
                   if path.suffix in SOURCE_SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts)})


def _stem(file: str) -> str:
    """A toc ``file`` without its suffix (``book/intro.md`` -> ``book/intro``)."""
    path = Path(str(file))
    return str(path.with_suffix("")) if path.suffix in SOURCE_SUFFIXES else str(path)


def page_starts(counts: list[int], contents_pages: int) -> list[int]:
    """The 1-based first page of each of ``counts`` printed pages, after ``contents_pages`` contents pages."""
    starts, page = [], contents_pages + 1
    for count in counts:
        starts.append(page)
        page += count
    return starts


def contents_html(title: str, pages: list[PrintedPage], starts: list[int]) -> str:
    """The contents page: the book's title, then each page's title and first page number, under its part."""
    rows, part = [], ""
    for page, start in zip(pages, starts):
        if page.entry.part and page.entry.part != part:
            part = page.entry.part
            rows.append(f'<div class="part">{html.escape(part)}</div>')
        rows.append(f'<div class="entry"><span class="name">{html.escape(page.title)}</span>'
                    f'<span class="dots"></span><span class="page">{start}</span></div>')
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Contents</title>'
            f"<style>{CONTENTS_CSS}</style></head><body><h1>{html.escape(title)}</h1><h2>Contents</h2>"
            + "\n".join(rows) + "</body></html>")


def numbers_html(total: int) -> str:
    """A document of ``total`` empty pages: printed with the footer template, it is the numbering layer."""
    page = '<div style="break-after: page; height: 1px"></div>'
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>body {{ margin: 0 }}'
            f"</style></head><body>{page * (total - 1)}<div style='height: 1px'></div></body></html>")


def _template(text: str = "", numbers: bool = False) -> str:
    """A header or footer template (Chromium's defaults are 0-size text, so the size is set here)."""
    body = ('<span class="pageNumber"></span> / <span class="totalPages"></span>' if numbers
            else html.escape(text))
    return (f'<div style="font-size: 8pt; color: #555; width: 100%; text-align: center; '
            f'font-family: sans-serif;">{body}</div>')


def _count_pages(data: bytes) -> int:
    from pypdf import PdfReader

    return len(PdfReader(io.BytesIO(data)).pages)


def _print_document(browser, document: str, folder: Path, name: str, **options) -> bytes:
    """Print an HTML string made here (the contents, the numbering layer) through ``browser``."""
    path = folder / name
    path.write_text(document, encoding="utf-8")
    browser.open(path.as_uri())
    return browser.print_pdf(**PAPER, **options)


def running_header(book_title: str, page_title: str) -> str:
    """The header printed on a page's PDF pages: "book · page", or the book's title alone on a page that bears it
    (the intro: its heading is the book's title, and "title · title" read twice)."""
    return book_title if page_title.strip() == book_title.strip() else f"{book_title} · {page_title}"


def print_page(browser, page: Path, entry: TocEntry, book_title: str) -> tuple[PrintedPage, bytes]:
    """Open one built page, wait for it to finish rendering, and print it.

    Args:
        browser: an open :class:`atlas_core.book.browser.Chromium`.
        page: the built HTML file.
        entry: its table-of-contents entry.
        book_title: printed in the header beside the page's title.

    Returns:
        (what was printed, the page's PDF bytes).

    Raises:
        PdfError: the page did not finish rendering (math left untypeset or a TeX error, an image that did
            not decode), or it printed to no page.
    """
    probe, _, _ = browser.open(page.as_uri())
    bad = [img["src"] for img in probe["images"] if not (img["width"] > 0 and img["height"] > 0)]
    if probe["typeset"] < probe["math"] or probe["math_errors"] or bad:
        raise PdfError(f"{entry.file}: not fully rendered ({probe['math'] - probe['typeset']} math elements not "
                       f"typeset, {probe['math_errors']} TeX errors, images not decoded: {bad}); "
                       f"run `atlas check-book` for details")
    shown = browser.evaluate(f"{PRINT_PREPARE}({json.dumps(PRINT_CSS)}, {json.dumps(STACKED)})",
                             f"print preparation of {entry.file}")
    header = running_header(book_title, shown["title"])
    data = browser.print_pdf(**PAPER, printBackground=True, displayHeaderFooter=True, generateTaggedPDF=True,
                             headerTemplate=_template(header), footerTemplate=_template(""))
    count = _count_pages(data)
    if count < 1:
        raise PdfError(f"{entry.file}: printed to no page")
    raster = tuple((i["width"], i["height"]) for i in shown["images"]
                   if not i["src"].split("?")[0].lower().endswith(".svg"))
    return PrintedPage(entry=entry, title=shown["title"], pdf_pages=count, header=header,
                       images=len(shown["images"]), raster=raster, captions=tuple(shown["captions"]),
                       scaled=shown["scaled"], too_wide=tuple(shown["too_wide"])), data


def _prefix_destinations(reader, prefix: str) -> set[str]:
    """Rename every named destination of one printed page (Chromium writes the page's anchors as a
    ``/Dests`` dictionary, and its in-page links as ``/Dest`` names) to ``/<prefix><anchor>``, so that two
    pages' equal anchors ("results") stay apart once merged. Returns the new names."""
    from pypdf.generic import NameObject

    dests = reader.trailer["/Root"].get("/Dests")
    renamed: set[str] = set()
    if dests is not None:
        dests = dests.get_object()
        for key in list(dests.keys()):
            name = NameObject(f"/{prefix}{key[1:]}")
            dests[name] = dests.pop(key)
            renamed.add(name)
    for page in reader.pages:
        for annot in page.get("/Annots") or []:
            annot = annot.get_object()
            if isinstance(annot.get("/Dest"), NameObject):
                annot[NameObject("/Dest")] = NameObject(f"/{prefix}{annot['/Dest'][1:]}")
    return renamed


def _link_target(uri: str, prefixes: dict[str, str], names: set[str]) -> str | None:
    """The merged document's destination for a link to a page of the book (``file:…/<page>.html#anchor``):
    the anchor, or the page's top (its ``main-content`` anchor); None when the page was not printed."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    path = unquote(parts.path)
    for file, prefix in prefixes.items():
        if path.endswith(f"/{file}.html"):
            for anchor in (unquote(parts.fragment), "main-content"):
                if anchor and f"/{prefix}{anchor}" in names:
                    return f"/{prefix}{anchor}"
    return None


def _relink(page, prefixes: dict[str, str], names: set[str]) -> None:
    """Turn links to the book's own HTML pages (``file:`` addresses into this machine's build folder) into
    links inside the PDF, and drop those to pages that were not printed; links to the web stay."""
    from pypdf.generic import ArrayObject, NameObject, TextStringObject

    annots = page.get("/Annots")
    if annots is None:
        return
    kept = ArrayObject()
    for ref in annots.get_object():
        annot = ref.get_object()
        uri = str(annot.get("/A", {}).get("/URI", ""))
        if uri.startswith("file:"):
            target = _link_target(uri, prefixes, names)
            if target is None:
                continue
            del annot["/A"]
            annot[NameObject("/Dest")] = TextStringObject(target)  # a key of the merged names tree, as pypdf writes it
        kept.append(ref)
    if kept:
        page[NameObject("/Annots")] = kept
    else:
        del page["/Annots"]


def assemble(contents: bytes, pages: list[tuple[PrintedPage, bytes]], numbers: bytes, title: str):
    """Merge the contents, every printed page and the numbering layer into one document.

    Each page's anchors are renamed ``p<i>-<anchor>`` (see :func:`_prefix_destinations`) and its links to
    other pages of the book point inside the PDF (:func:`_relink`).

    Args:
        contents: the contents page(s), printed.
        pages: each printed page with its PDF bytes, in book order.
        numbers: the numbering layer, one page per page of the result (laid over each).
        title: the document's title (its metadata).

    Returns:
        A :class:`pypdf.PdfWriter`, with one bookmark per page (under its part's bookmark).

    Raises:
        PdfError: the numbering layer's length differs from the merged document's.
    """
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(contents)), import_outline=False)
    starts = page_starts([p.pdf_pages for p, _ in pages], len(writer.pages))
    prefixes = {page.entry.file: f"p{i}-" for i, (page, _) in enumerate(pages)}
    readers = [PdfReader(io.BytesIO(data)) for _, data in pages]
    names = set().union(*(_prefix_destinations(r, prefixes[p.entry.file]) for (p, _), r in zip(pages, readers)))
    parts: dict[str, object] = {}
    for (page, _), reader, start in zip(pages, readers, starts):
        writer.append(reader, import_outline=False)
        part = page.entry.part
        if part and part not in parts:
            parts[part] = writer.add_outline_item(title=part, page_number=start - 1)
        writer.add_outline_item(title=page.title, page_number=start - 1, parent=parts.get(part))
    layer = PdfReader(io.BytesIO(numbers))
    if len(layer.pages) != len(writer.pages):
        raise PdfError(f"numbering layer has {len(layer.pages)} pages for a {len(writer.pages)}-page book")
    for page, number in zip(writer.pages, layer.pages):  # links once every destination is in (pypdf drops
        _relink(page, prefixes, names)                   # a link to a page not yet appended)
        page.merge_page(number)
    writer.add_metadata({"/Title": title, "/Creator": "atlas book --pdf (headless Chromium, pypdf)"})
    return writer


def print_book(html_dir: Path | str, toc: Path | str, out: Path | str, title: str,
               executable: str | None = None) -> BookPdf:
    """Print every page of the built book, in table-of-contents order, into one PDF written atomically.

    Args:
        html_dir: the built HTML folder (``_build/html``).
        toc: the book's ``_toc.yml`` (the page order).
        out: the PDF to write.
        title: the book's title (contents page, headers, metadata).
        executable: Chromium to use (default: :func:`atlas_core.book.browser.find_chromium`).

    Returns:
        The written :class:`BookPdf`.

    Raises:
        FileNotFoundError: a page of the table of contents was not built.
        BrowserError: no Chromium, or it stopped answering.
        PdfError: a page did not render or print (see :func:`print_page`).
    """
    from atlas_core.book.browser import Chromium

    html_dir = Path(html_dir).resolve()
    entries = toc_entries(toc)
    missing = [e.file for e in entries if not e.html(html_dir).is_file()]
    if missing:
        raise FileNotFoundError(f"pages of the table of contents not built under {html_dir}: {', '.join(missing)}; "
                                "build the book first")
    with Chromium(executable, timeout=PRINT_TIMEOUT_S) as browser, \
            tempfile.TemporaryDirectory(prefix="atlas-pdf-") as tmp:
        # Pages are probed as they will print: print media, laid out as wide as the paper's text column.
        browser.call("Emulation.setEmulatedMedia", session=True, media="print")
        browser.call("Emulation.setDeviceMetricsOverride", session=True, width=COLUMN_PX, height=1000,
                     deviceScaleFactor=1, mobile=False)
        printed = [print_page(browser, e.html(html_dir), e, title) for e in entries]
        pages = [p for p, _ in printed]
        contents_pages, contents = 1, b""
        for _ in range(MAX_CONTENTS_ROUNDS):  # its own length moves every start: print until it is stable
            document = contents_html(title, pages, page_starts([p.pdf_pages for p in pages], contents_pages))
            contents = _print_document(browser, document, Path(tmp), "contents.html", displayHeaderFooter=True,
                                       headerTemplate=_template(title), footerTemplate=_template(""))
            if _count_pages(contents) == contents_pages:
                break
            contents_pages = _count_pages(contents)
        else:
            raise PdfError("the contents page's length did not settle")
        total = contents_pages + sum(p.pdf_pages for p in pages)
        numbers = _print_document(browser, numbers_html(total), Path(tmp), "numbers.html", displayHeaderFooter=True,
                                  headerTemplate=_template(""), footerTemplate=_template(numbers=True))
    writer = assemble(contents, printed, numbers, title)
    with atomic_path(out) as staged:
        with open(staged, "wb") as f:
            writer.write(f)
    return BookPdf(path=Path(out), pages=tuple(pages), contents_pages=contents_pages)


def _squash(text: str) -> str:
    """Text as compared with the PDF's: ligatures unfolded ("ﬁ" -> "fi", NFKC) and all whitespace removed
    (PDF text extraction breaks lines and spaces freely)."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


def image_sizes(page) -> set[tuple[int, int]]:
    """``(width, height)`` in pixels of every image a PDF page draws (inside form XObjects too)."""
    found: set[tuple[int, int]] = set()

    def visit(resources, seen) -> None:
        xobjects = (resources or {}).get("/XObject") if resources is not None else None
        if xobjects is None:
            return
        for ref in xobjects.get_object().values():
            obj = ref.get_object()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.get("/Subtype") == "/Image":
                found.add((int(obj["/Width"]), int(obj["/Height"])))
            elif obj.get("/Subtype") == "/Form":
                visit(obj.get("/Resources"), seen)

    visit(page.get("/Resources"), set())
    return found


_FIGURE_MARK = re.compile(rb"/Figure\s*<<[^>]*>>\s*BDC")


def figure_marks(page) -> int:
    """How many figures a PDF page draws: Chromium's tagged PDF marks the drawing of every ``<img>``, raster
    or SVG (whose vectors are drawn inline), as a ``/Figure`` marked-content sequence."""
    contents = page.get_contents()
    return 0 if contents is None else len(_FIGURE_MARK.findall(contents.get_data()))


def check_pdf(book: BookPdf) -> list[str]:
    """Read the written PDF back and list what a reader would miss (empty: the PDF passed).

    Checked: the file opens and holds every printed page (more than none, at least one per book page);
    every page carries its number "n / N"; the contents page lists each page's title and first page; each
    book page's PDF range has extractable text (beside its header and numbers) with its title, every caption
    number shown on the HTML page ("Fig. 3", "Table 2"), a drawn figure for every image (:func:`figure_marks`),
    every raster figure as an image of the same pixel size (present, and not downsampled), and nothing left
    wider than the text column.
    """
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(book.path)
        total = len(reader.pages)
    except (OSError, PdfReadError) as err:
        return [f"{book.path}: cannot be read as a PDF ({err})"]
    if total == 0 or total < len(book.pages) or total != book.total_pages:
        return [f"{book.path}: {total} PDF pages for {len(book.pages)} book pages "
                f"({book.total_pages} printed)"]
    texts = [_squash(p.extract_text() or "") for p in reader.pages]
    problems = [f"PDF page {i}: no page number '{i} / {total}'" for i, text in enumerate(texts, 1)
                if f"{i}/{total}" not in text]
    contents = "".join(texts[:book.contents_pages])
    for page, start in zip(book.pages, book.starts()):
        where = f"{page.entry.file} (PDF pages {start}-{start + page.pdf_pages - 1})"
        if _squash(page.title) + str(start) not in contents:
            problems.append(f"contents: no entry '{page.title} … {start}'")
        span = range(start - 1, start - 1 + page.pdf_pages)
        # once per page: the header is printed once, and on the intro it is the title that the body repeats
        text = "".join(texts[i].replace(_squash(page.header), "", 1).replace(f"{i + 1}/{total}", "") for i in span)
        if not text:  # the body, without the running header and the page numbers
            problems.append(f"{where}: no extractable text")
        elif _squash(page.title) not in text:
            problems.append(f"{where}: title '{page.title}' not found in the text")
        problems += [f"{where}: caption '{c}' not found in the text" for c in page.captions
                     if _squash(c) not in text]
        marks = sum(figure_marks(reader.pages[i]) for i in span)
        if marks < page.images:
            problems.append(f"{where}: {page.images} images on the page, {marks} figures drawn in the PDF")
        drawn = set().union(*(image_sizes(reader.pages[i]) for i in span))
        problems += [f"{where}: figure of {w}x{h} px not in the PDF at full resolution" for w, h in page.raster
                     if (w, h) not in drawn]
        problems += [f"{where}: {what} is wider than the page (cut at the margin)" for what in page.too_wide]
    return problems


def book_title(config: Path | str) -> str:
    """The ``title`` of a Jupyter Book ``_config.yml`` ("Book" when it has none)."""
    data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    return str(data.get("title") or "Book")


def pdf_digest(html_dir: Path) -> str:
    """sha256 of the built HTML (:func:`atlas_core.book.runner.html_digest`, which covers the browser
    check) and of this printer: equal digests, equal PDF."""
    return hashlib.sha256((html_digest(html_dir) + "\0").encode() + Path(__file__).read_bytes()).hexdigest()


def book_pdf(html_dir: Path | str = ROOT / "_build" / "html", root: Path | str = ROOT,
             executable: str | None = None) -> str:
    """``atlas book --pdf``: print the built book to ``<build>/pdf/book.pdf`` and check the PDF.

    A PDF made from byte-for-byte the same HTML by the same printer (digest stamped beside it) is kept and
    not printed again.

    Args:
        html_dir: the built HTML folder.
        root: the book's source folder (``_toc.yml``, ``_config.yml``).
        executable: Chromium to use.

    Returns:
        One line for the build's output: the PDF's path, page count and time, or why it was kept.

    Raises:
        PdfError: a page did not print, Chromium is missing or stopped answering, or the PDF failed
            :func:`check_pdf` (each problem listed on stderr).
        FileNotFoundError: a page of the table of contents was not built.
    """
    html_dir, root = Path(html_dir), Path(root)
    out = html_dir.parent / "pdf" / PDF_NAME
    stamp = out.parent / STAMP_NAME
    digest = pdf_digest(html_dir)
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return f"PDF up to date (HTML unchanged since it was printed): {out}"
    stamp.unlink(missing_ok=True)
    start = time.time()
    from atlas_core.book.browser import BrowserError

    try:
        book = print_book(html_dir, root / "_toc.yml", out, book_title(root / "_config.yml"), executable)
    except BrowserError as err:
        raise PdfError(f"printing the PDF: {err}") from None
    problems = check_pdf(book)
    if problems:
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        raise PdfError(f"the book's PDF failed its check ({len(problems)} problems above): {out}")
    with atomic_path(stamp) as tmp:
        tmp.write_text(digest + "\n")
    return (f"PDF check: {book.total_pages} pages ({book.contents_pages} contents + {len(book.pages)} book pages), "
            f"{sum(p.images for p in book.pages)} figures, all present, {sum(p.scaled for p in book.pages)} wide "
            f"elements scaled to the column; {time.time() - start:.1f} s: {out}")
