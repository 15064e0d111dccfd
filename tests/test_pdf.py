"""`atlas book --pdf`: the table of contents read in order, the pages merged with their numbers, contents and
bookmarks, and the check of the written PDF (on small PDFs made here); a tiny Jupyter Book (a page with math,
a chapter with a matplotlib figure) printed through headless Chromium end to end (slow)."""

import io
import shutil
import unicodedata
from pathlib import Path

import pytest
import yaml
from pypdf import PdfReader, PdfWriter
from pypdf.generic import (ArrayObject, DecodedStreamObject, DictionaryObject, FloatObject, NameObject,
                           NumberObject, TextStringObject)

from atlas_core.book import pdf, runner
from atlas_core.book.pdf import (BookPdf, PdfError, PrintedPage, TocEntry, assemble, check_pdf, contents_html,
                                 image_sizes, page_starts, toc_entries)
from tinybook import needs_chromium  # skipped where no Chromium is installed

ROOT = Path(__file__).resolve().parents[1]


# --- small PDFs ------------------------------------------------------------------------------------

def _name(text: str) -> NameObject:
    return NameObject(text)


def pdf_bytes(pages: list[list[str]], image: tuple[int, int] | None = None, links: tuple[str, ...] = (),
              anchors: tuple[str, ...] = ()) -> bytes:
    """A PDF of Letter pages, each with its lines of Helvetica text; ``image`` (w, h) draws a grey image of
    that pixel size on the first page, ``links`` add link annotations to it (a URI, or ``#anchor`` for an
    in-document link as Chromium writes it), ``anchors`` are named destinations on the first page (in the
    catalog's ``/Dests``, as Chromium writes a page's element ids)."""
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({_name("/Type"): _name("/Font"), _name("/Subtype"): _name("/Type1"),
                                                _name("/BaseFont"): _name("/Helvetica")}))
    for n, lines in enumerate(pages):
        page = writer.add_blank_page(612, 792)
        resources = DictionaryObject({_name("/Font"): DictionaryObject({_name("/F1"): font})})
        ops = "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        if image and n == 0:
            w, h = image
            img = DecodedStreamObject()
            img.set_data(bytes(w * h))
            img.update({_name("/Type"): _name("/XObject"), _name("/Subtype"): _name("/Image"),
                        _name("/Width"): NumberObject(w), _name("/Height"): NumberObject(h),
                        _name("/ColorSpace"): _name("/DeviceGray"), _name("/BitsPerComponent"): NumberObject(8)})
            resources[_name("/XObject")] = DictionaryObject({_name("/Im1"): writer._add_object(img)})
            ops += f" /Figure <</MCID 0>> BDC q {w} 0 0 {h} 72 300 cm /Im1 Do Q EMC"  # tagged, as Chromium does
        page[_name("/Resources")] = resources
        content = DecodedStreamObject()
        content.set_data(ops.encode("latin-1"))
        page[_name("/Contents")] = writer._add_object(content)
        if links and n == 0:
            page[_name("/Annots")] = ArrayObject(writer._add_object(DictionaryObject({
                _name("/Type"): _name("/Annot"), _name("/Subtype"): _name("/Link"),
                _name("/Rect"): ArrayObject(FloatObject(v) for v in (72, 72, 144, 84)),
                **({_name("/Dest"): _name("/" + uri[1:])} if uri.startswith("#") else
                   {_name("/A"): DictionaryObject({_name("/S"): _name("/URI"), _name("/URI"): TextStringObject(uri)})}),
            })) for uri in links)
    if anchors:
        first = writer.pages[0].indirect_reference
        writer._root_object[_name("/Dests")] = DictionaryObject({
            _name(f"/{a}"): ArrayObject([first, _name("/XYZ"), FloatObject(0), FloatObject(700), FloatObject(0)])
            for a in anchors})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def numbers(total: int) -> bytes:
    return pdf_bytes([[f"{i} / {total}"] for i in range(1, total + 1)])


def entry(file: str, part: str = "") -> TocEntry:
    return TocEntry(file=file, part=part)


def small_book(tmp_path, figure=(30, 20), captions=("Fig. 1",), images=1, too_wide=(), header=True) -> BookPdf:
    """Contents, an intro of one page, a chapter of two pages (a figure and its caption), merged and written."""
    intro = PrintedPage(entry=entry("book/intro"), title="A test book", pdf_pages=1)
    chapter = PrintedPage(entry=entry("book/chapters/demo", "Chapters"), title="1. A glued chapter", pdf_pages=2,
                          header="A book - 1. A glued chapter", images=images, raster=(figure,), captions=captions,
                          too_wide=too_wide)
    printed = [(intro, pdf_bytes([["A test book", "Some words."]])),
               (chapter, pdf_bytes([["A book - 1. A glued chapter"] * header + ["1. A glued chapter", "Fig. 1 A line."],
                                    ["A book - 1. A glued chapter"] * header + ["More words."]],
                                   image=(30, 20), links=("file:///tmp/x/book/intro.html", "https://doi.org/10.1/x")))]
    contents = pdf_bytes([["Contents", "A test book 2", "Chapters", "1. A glued chapter 3"]])
    writer = assemble(contents, printed, numbers(4), "A book")
    path = tmp_path / "book.pdf"
    with open(path, "wb") as f:
        writer.write(f)
    return BookPdf(path=path, pages=(intro, chapter), contents_pages=1)


# --- the table of contents -------------------------------------------------------------------------

def test_toc_entries_follow_the_reading_order_with_their_parts(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({"format": "jb-book", "root": "book/intro", "parts": [
        {"caption": "Set-up", "chapters": [{"file": "book/methods.md"}]},
        {"caption": "Chapters", "chapters": [{"file": "book/chapters/a", "sections": [{"file": "book/chapters/a1"}]},
                                             {"file": "book/chapters/b.ipynb"}]},
        {"caption": "Closing", "chapters": [{"file": "book/references"}]}]}))
    assert toc_entries(toc) == (entry("book/intro"), entry("book/methods", "Set-up"),
                                entry("book/chapters/a", "Chapters"), entry("book/chapters/a1", "Chapters"),
                                entry("book/chapters/b", "Chapters"), entry("book/references", "Closing"))


def test_toc_glob_entries_list_their_pages_sorted_and_skip_pages_listed_elsewhere(tmp_path):
    code = tmp_path / "book" / "chapters" / "code"
    code.mkdir(parents=True)
    for name in ("02-b.md", "01-a.ipynb", "10-c.md", "notes.txt", ".hidden.md"):
        (code / name).write_text("")
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({"root": "book/intro", "parts": [
        {"caption": "Chapters", "chapters": [{"file": "book/chapters/code/10-c"}]},
        {"caption": "Appendix", "chapters": [{"glob": "book/chapters/code/*"}]}]}))
    assert toc_entries(toc) == (entry("book/intro"), entry("book/chapters/code/10-c", "Chapters"),
                                entry("book/chapters/code/01-a", "Appendix"),
                                entry("book/chapters/code/02-b", "Appendix"))


def test_toc_entries_without_parts_and_without_a_root(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({"root": "intro", "chapters": [{"file": "a"}, {"file": "b"}]}))
    assert [e.file for e in toc_entries(toc)] == ["intro", "a", "b"]
    toc.write_text(yaml.safe_dump({"chapters": [{"file": "a"}]}))
    with pytest.raises(ValueError, match="no 'root' page"):
        toc_entries(toc)


def test_the_real_toc_prints_every_chapter_in_the_runners_order():
    files = [e.file for e in toc_entries(ROOT / "_toc.yml")]
    # the chapters themselves, not their appendix pages (book/chapters/code/…, printed once a build made them)
    chapters = [Path(f).name for f in files if f.startswith("book/chapters/") and f.count("/") == 2]
    assert chapters == list(runner.CHAPTERS) and files[0] == "book/intro"


# --- numbering, contents, merging ------------------------------------------------------------------

def test_page_starts_count_the_contents_and_every_earlier_page():
    assert page_starts([1, 3, 2], 1) == [2, 3, 6]
    assert page_starts([2], 2) == [3]
    assert page_starts([], 1) == []


def test_contents_lists_each_title_with_its_first_page_under_its_part():
    pages = [PrintedPage(entry=entry("i"), title="Intro", pdf_pages=1),
             PrintedPage(entry=entry("a", "Chapters"), title="1. A & B", pdf_pages=3),
             PrintedPage(entry=entry("b", "Chapters"), title="2. C", pdf_pages=1)]
    text = contents_html("The <book>", pages, page_starts([1, 3, 1], 1))
    assert "The &lt;book&gt;" in text and "1. A &amp; B" in text
    assert text.count('class="part"') == 1  # one heading per part, not per page
    assert [s.split("<")[0] for s in text.split('class="page">')[1:]] == ["2", "3", "6"]


def test_assemble_merges_numbers_every_page_and_bookmarks_each(tmp_path):
    book = small_book(tmp_path)
    reader = PdfReader(book.path)
    assert len(reader.pages) == book.total_pages == 4
    texts = [p.extract_text() for p in reader.pages]
    assert [f"{i} / 4" in t for i, t in enumerate(texts, 1)] == [True] * 4  # the layer, merged onto each page
    assert "Contents" in texts[0] and "A glued chapter" in texts[2] and "More words." in texts[3]
    outline = reader.outline
    assert outline[0]["/Title"] == "A test book" and outline[1]["/Title"] == "Chapters"
    assert outline[2][0]["/Title"] == "1. A glued chapter"  # under its part
    assert reader.get_destination_page_number(outline[2][0]) == 2  # 0-based: the third PDF page
    uris = [a.get_object()["/A"]["/URI"] for a in reader.pages[2].get("/Annots", [])]
    assert uris == ["https://doi.org/10.1/x"]  # the link into this machine's build folder is gone
    assert reader.metadata.title == "A book"


def test_links_between_pages_point_inside_the_pdf_and_equal_anchors_stay_apart():
    html = "file:///tmp/x/_build/html/book"
    intro = PrintedPage(entry=entry("book/intro"), title="Intro", pdf_pages=1)
    chapter = PrintedPage(entry=entry("book/chapters/a", "Chapters"), title="A", pdf_pages=1)
    printed = [(intro, pdf_bytes([["Intro"]], anchors=("main-content", "results"),
                                 links=(f"{html}/chapters/a.html#results", f"{html}/chapters/a.html",
                                        f"{html}/chapters/gone.html", "#results"))),
               (chapter, pdf_bytes([["A"]], anchors=("main-content", "results"),
                                   links=(f"{html}/intro.html#nowhere", "#results", "https://doi.org/10.1/x")))]
    writer = assemble(pdf_bytes([["Contents"]]), printed, numbers(3), "A book")
    out = io.BytesIO()
    writer.write(out)
    reader = PdfReader(out)
    dests = reader.named_destinations

    def targets(page):
        found = []
        for annot in reader.pages[page]["/Annots"]:
            annot = annot.get_object()
            found.append((annot["/Dest"], reader.get_destination_page_number(dests[annot["/Dest"]]))
                         if "/Dest" in annot else annot["/A"]["/URI"])
        return found

    # the chapter's anchor, the chapter's top, (a page not printed: dropped), the intro's own anchor
    assert targets(1) == [("/p1-results", 2), ("/p1-main-content", 2), ("/p0-results", 1)]
    # an anchor the intro lacks: its top; the chapter's own "results", not the intro's; the web link kept
    assert targets(2) == [("/p0-main-content", 1), ("/p1-results", 2), "https://doi.org/10.1/x"]


def test_assemble_refuses_a_numbering_layer_of_the_wrong_length():
    page = PrintedPage(entry=entry("i"), title="Intro", pdf_pages=1)
    with pytest.raises(PdfError, match="numbering layer has 3 pages for a 2-page book"):
        assemble(pdf_bytes([["Contents"]]), [(page, pdf_bytes([["Intro"]]))], numbers(3), "A book")


# --- the check of the written PDF --------------------------------------------------------------------

def test_a_complete_pdf_passes_its_check(tmp_path):
    assert check_pdf(small_book(tmp_path)) == []


def test_image_sizes_are_read_from_the_page(tmp_path):
    book = small_book(tmp_path)
    reader = PdfReader(book.path)
    assert image_sizes(reader.pages[2]) == {(30, 20)} and image_sizes(reader.pages[3]) == set()


def test_a_missing_or_downsampled_figure_is_caught(tmp_path):
    problems = check_pdf(small_book(tmp_path, figure=(60, 40)))  # the HTML showed 60x40 px; the PDF holds 30x20
    assert problems == ["book/chapters/demo (PDF pages 3-4): figure of 60x40 px not in the PDF at full resolution"]


def test_an_image_not_drawn_and_an_element_too_wide_are_caught(tmp_path):
    problems = check_pdf(small_book(tmp_path, images=2, too_wide=('table "x y"',)))
    assert problems == ["book/chapters/demo (PDF pages 3-4): 2 images on the page, 1 figures drawn in the PDF",
                        'book/chapters/demo (PDF pages 3-4): table "x y" is wider than the page (cut at the margin)']


def test_the_running_header_and_numbers_are_not_the_pages_text(tmp_path):
    header = "A book - Intro"
    page = PrintedPage(entry=entry("i"), title="Intro", pdf_pages=1, header=header)
    path = tmp_path / "b.pdf"
    for body, problem in (([], "no extractable text"), (["Other words."], "title 'Intro' not found in the text")):
        writer = assemble(pdf_bytes([["Contents", "Intro 2"]]), [(page, pdf_bytes([[header, *body]]))], numbers(2), "A")
        writer.write(path)
        assert check_pdf(BookPdf(path=path, pages=(page,), contents_pages=1)) == [f"i (PDF pages 2-2): {problem}"]


def test_figure_marks_count_tagged_drawings(tmp_path):
    book = small_book(tmp_path)
    reader = PdfReader(book.path)
    assert [pdf.figure_marks(p) for p in reader.pages] == [0, 0, 1, 0]


def test_a_missing_caption_is_caught(tmp_path):
    problems = check_pdf(small_book(tmp_path, captions=("Fig. 1", "Table 1")))
    assert problems == ["book/chapters/demo (PDF pages 3-4): caption 'Table 1' not found in the text"]


def test_page_counts_titles_and_contents_are_checked(tmp_path):
    book = small_book(tmp_path)
    longer = PrintedPage(entry=book.pages[1].entry, title=book.pages[1].title, pdf_pages=3)
    assert "5 printed" in check_pdf(BookPdf(path=book.path, pages=(book.pages[0], longer), contents_pages=1))[0]
    renamed = PrintedPage(entry=book.pages[0].entry, title="Another title", pdf_pages=1)
    problems = check_pdf(BookPdf(path=book.path, pages=(renamed, book.pages[1]), contents_pages=1))
    assert problems == ["contents: no entry 'Another title … 2'",
                        "book/intro (PDF pages 2-2): title 'Another title' not found in the text"]


def test_a_pdf_without_numbers_or_text_is_caught(tmp_path):
    path = tmp_path / "plain.pdf"
    path.write_bytes(pdf_bytes([["Contents", "Intro 2"], []]))
    page = PrintedPage(entry=entry("i"), title="Intro", pdf_pages=1)
    problems = check_pdf(BookPdf(path=path, pages=(page,), contents_pages=1))
    assert problems == ["PDF page 1: no page number '1 / 2'", "PDF page 2: no page number '2 / 2'",
                        "i (PDF pages 2-2): no extractable text"]


def test_an_unreadable_file_is_one_problem(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"not a pdf")
    problems = check_pdf(BookPdf(path=path, pages=(), contents_pages=1))
    assert len(problems) == 1 and "cannot be read as a PDF" in problems[0]


def test_an_unbuilt_page_is_refused_before_chromium_starts(tmp_path, monkeypatch):
    import atlas_core.book.browser as browser

    monkeypatch.setattr(browser, "Chromium", lambda *a, **k: pytest.fail("Chromium started"))
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump({"root": "book/intro"}))
    with pytest.raises(FileNotFoundError, match="not built .*book/intro; build the book first"):
        pdf.print_book(tmp_path / "html", tmp_path / "_toc.yml", tmp_path / "b.pdf", "T")


# --- a tiny book printed end to end ------------------------------------------------------------------

CHAPTER = '''# %% [markdown]
# # A chapter with a figure
#
# {numref}`fig-line` shows a line, {numref}`fig-curve` a curve (SVG, as the book's figures are).
#
# ```{glue:figure} line_fig
# :name: fig-line
#
# A line that rises.
# ```
#
# ```{glue:figure} line_curve
# :name: fig-curve
#
# A curve that bends.
# ```

# %% tags=["parameters"]
model = "none"
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
from atlas_core.glue import prefixed_glue

fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
ax.plot([0, 1], [0, 1])
prefixed_glue("line")("fig", fig)
plt.close(fig)
from matplotlib_inline.backend_inline import set_matplotlib_formats

set_matplotlib_formats("svg")
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1, 2], [0, 1, 4])
prefixed_glue("line")("curve", fig)
plt.close(fig)
pathlib.Path(results_dir, "line.json").write_text(json.dumps({"figures": 1}))
'''

INTRO = """# A tiny book

Inline $\\sqrt{x}$ and a display, then {doc}`chapters/line`:

$$E = m c^2$$

A table wider than the paper's column (scaled to fit when printed):

| """ + " | ".join(f"column_{i}_without_a_break" for i in range(12)) + """ |
|""" + "---|" * 12 + """
| """ + " | ".join(str(i) for i in range(12)) + """ |

A prose table of many columns (printed as stacked rows, each cell under its column's name):

| claim | source | ours | verdict |
|---|---|---|---|
| """ + " | ".join(f"a sentence of several words in the {c} cell" for c in ("claim", "source", "ours", "verdict")) + """ |
"""


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory):
    """Two pages (math; a matplotlib figure) built like the real book: its config, local MathJax, -W -n."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("book")
    shutil.copy(ROOT / "_config.yml", folder / "_config.yml")
    (folder / "book" / "chapters").mkdir(parents=True)
    (folder / "book" / "references.bib").write_text("")  # the config names a bibliography
    shutil.copytree(ROOT / "book" / "_ext", folder / "book" / "_ext")
    shutil.copytree(ROOT / "book" / "_static", folder / "book" / "_static", ignore=shutil.ignore_patterns("mathjax"))
    runner.install_mathjax(folder / "book" / "_static" / "mathjax")
    (folder / "book" / "intro.md").write_text(INTRO)
    (folder / "line.py").write_text(CHAPTER)
    runner.run_chapter("line", "none", {}, folder / "book" / "chapters", folder / "line.py")
    (folder / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/intro", "parts": [
        {"caption": "Chapters", "numbered": True, "chapters": [{"file": "book/chapters/line"}]}]}))
    jb = Path(sys.executable).with_name("jupyter-book")
    built = subprocess.run([str(jb), "build", str(folder), "--path-output", str(folder), "-W", "-n"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return folder


def figure_size(html: Path) -> tuple[int, int]:
    """Pixel size of the book's one figure (the PNG the HTML shows)."""
    from PIL import Image

    (png,) = (html / "_images").glob("*.png")
    with Image.open(png) as image:
        return image.size


@pytest.mark.slow
@needs_chromium
def test_a_tiny_book_prints_to_a_checked_pdf(tiny_book, monkeypatch):
    html = tiny_book / "_build" / "html"
    line = pdf.book_pdf(html, tiny_book)
    out = tiny_book / "_build" / "pdf" / "book.pdf"
    assert line.startswith("PDF check:") and str(out) in line
    assert "2 figures, all present, 1 wide elements scaled to the column" in line  # the table; no problem left
    reader = PdfReader(out)
    texts = [unicodedata.normalize("NFKC", p.extract_text()) for p in reader.pages]  # ligatures: "ﬁ" -> "fi"
    # the prose table printed as stacked rows, each cell under its column's name; the table of numbers is not
    intro = " ".join(texts[1].split())
    assert "verdict: a sentence of several words in the verdict cell" in intro and "column_0_without_a_break:" not in intro
    assert len(reader.pages) >= 3  # contents, the intro, the chapter
    assert "Contents" in texts[0] and "A tiny book" in texts[0] and "A chapter with a figure" in texts[0]
    assert "mc2" in "".join(texts[1].split())  # MathJax typeset the display before the print
    assert any("Fig. 1" in t and "A line that rises." in t for t in texts[2:])
    assert any("Fig. 2" in t and "A curve that bends." in t for t in texts[2:])
    assert sum(pdf.figure_marks(p) for p in reader.pages[2:]) == 2  # the PNG and the SVG, each drawn
    assert any(figure_size(html) in image_sizes(p) for p in reader.pages[2:])  # the figure's PNG, full size
    assert all(f"{i} / {len(texts)}" in t for i, t in enumerate(texts, 1))
    assert not any(word in texts[1] for word in ("Search the book", "Contents\n", "Next"))  # no theme chrome
    links = [a.get_object() for a in reader.pages[1].get("/Annots", [])]  # the intro's link to the chapter
    chapter_start = next(i for i, t in enumerate(texts) if "A line that rises." in t)  # its caption
    assert [reader.get_destination_page_number(reader.named_destinations[a["/Dest"]]) for a in links] == [chapter_start]

    def trip(*args, **kwargs):
        raise AssertionError("printed again with nothing changed")

    monkeypatch.setattr(pdf, "print_book", trip)
    assert pdf.book_pdf(html, tiny_book).startswith("PDF up to date")  # nothing changed: kept


@pytest.mark.slow
@needs_chromium
def test_a_figure_lost_from_the_pdf_fails_the_check(tiny_book, tmp_path):
    html = Path(shutil.copytree(tiny_book / "_build" / "html", tmp_path / "_build" / "html"))
    book = pdf.print_book(html, tiny_book / "_toc.yml", tmp_path / "b.pdf", "T")
    chapter = book.pages[1]
    assert chapter.images == 2 and chapter.raster == (figure_size(html),)  # the SVG is drawn as vectors
    assert chapter.captions == ("Fig. 1", "Fig. 2") and book.pages[0].scaled == 1
    assert check_pdf(book) == []
    writer = PdfWriter(clone_from=book.path)  # the same PDF with the chapter's images removed
    writer.remove_images()
    writer.write(book.path)
    w, h = figure_size(html)
    lost = f"book/chapters/line (PDF pages 3-3): figure of {w}x{h} px not in the PDF at full resolution"
    assert lost in check_pdf(book)


def test_the_running_header_names_the_book_once_on_its_title_page():
    from atlas_core.book.pdf import running_header

    assert running_header("A book", "1. Methods") == "A book · 1. Methods"
    assert running_header("A book", "A book") == "A book"  # the intro's heading is the book's title


def test_a_page_whose_header_is_its_title_still_shows_its_title(tmp_path):
    """The intro's header is the book's title alone, which is also the page's heading: the check removes the
    header once per PDF page, so the heading is still found (and a page with only the header still fails)."""
    page = PrintedPage(entry=entry("i"), title="A book", pdf_pages=1, header="A book")
    path = tmp_path / "b.pdf"
    for body, want in ((["A book", "Words."], []), (["Words."], ["i (PDF pages 2-2): title 'A book' not found in the text"])):
        assemble(pdf_bytes([["Contents", "A book 2"]]), [(page, pdf_bytes([["A book", *body]]))], numbers(2), "A").write(path)
        assert check_pdf(BookPdf(path=path, pages=(page,), contents_pages=1)) == want
