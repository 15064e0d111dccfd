"""The book's own text: its citation, the findings box's source numbers, and the references list."""

import re
import sys
import tomllib
from pathlib import Path

import yaml

from atlas_core import claims

ROOT = Path(__file__).resolve().parents[1]


def _intro() -> str:
    return (ROOT / "book" / "intro.md").read_text(encoding="utf-8")


def test_citation_cff_and_the_intros_bibtex_name_the_same_book_and_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    intro = _intro()
    title = re.search(r"^# (.+)$", intro, re.M).group(1)
    bibtex = re.search(r"```bibtex\n(.*?)```", intro, re.S).group(1)
    assert cff["cff-version"] == "1.2.0" and cff["version"] == cff["preferred-citation"]["version"] == version
    assert cff["title"] == cff["preferred-citation"]["title"] == title
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", bibtex, re.M))
    assert fields["version"] == version and fields["title"] == title
    assert version in fields["howpublished"] and cff["date-released"]  # the version a reader cites, and its date
    assert "ATLAS" not in title  # distinct from the work the book tests


def test_the_findings_box_quotes_the_source_numbers_as_claims_has_them():
    box = re.search(r"````\{admonition\} Findings at a glance(.*?)````", _intro(), re.S).group(1)
    s = claims.source
    low, high = s("headq_removed")
    quoted = [f"{s('oh_gpt2'):.3f} (GPT-2), {s('oh_qwen'):.3f} (Qwen2.5)", f"| {s('twonn')} |",
              f"{low:.0%}–{high:.0%}".replace("%–", "–"), f"{s('mass'):.1%}", f"{s('speedup'):.0f}×"]
    missing = [q for q in quoted if q not in box]
    assert not missing, f"the findings box does not quote these as claims.SOURCE has them: {missing}"
    assert box.count("{glue:text}") >= 9 and "sec-rule" in box  # every number of ours is glued; the rule is linked


def test_references_render_without_raw_latex_math_and_are_labelled_author_year():
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    assert "$" not in bib and "^" not in bib  # "H$_2$O" and "O(n^2)" printed raw in the list
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import atlas_bib
    finally:
        sys.path.pop(0)
    from pybtex.database import parse_string

    entries = parse_string("""
        @misc{a, author = {Ruiz Williams, Jorge L.}, title = {One}, year = {2026}}
        @misc{b, author = {Ruiz Williams, Jorge L.}, title = {Two}, year = {2026}}
        @misc{c, author = {Cover, Thomas M. and Thomas, Joy A.}, title = {Elements}, year = {2006}}
        @misc{d, author = {Grattafiori, Aaron and others}, title = {Llama}, year = {2024}}
        @misc{e, author = {{Gemma Team}}, title = {Gemma}, year = {2025}}
        @misc{f, author = {R{\\'e}, Christopher and Ashkboos, Saleh and Frantar, Elias}, title = {X}, year = {2023}}
    """, "bibtex").entries
    style = atlas_bib.AuthorYearStyle()
    labels = {e.key: e.label for e in style.format_entries(entries.values())}
    assert labels == {"c": "Cover and Thomas 2006", "e": "Gemma Team 2025", "d": "Grattafiori et al. 2024",
                      "f": "Ré et al. 2023", "a": "Ruiz Williams 2026a", "b": "Ruiz Williams 2026b"}
    assert list(labels) == ["c", "e", "d", "f", "a", "b"]  # sorted by label, then title


GLUE_TEXT = re.compile(r"\{glue:text\}`(?:chapters/(\w+)\.ipynb::)?(\w+):([^`]*)`")


def _formats(text: str, chapter: str | None = None) -> dict[tuple[str, str], set[str]]:
    """{(chapter, key): the formats ``{glue:text}`` gives that key in ``text``}; ``chapter`` for a chapter's own
    prose, whose references carry no chapter."""
    found: dict[tuple[str, str], set[str]] = {}
    for m in GLUE_TEXT.finditer(text):
        found.setdefault((m.group(1) or chapter, m.group(2)), set()).add(m.group(3))
    return found


def test_book_pages_glue_each_number_in_the_format_its_chapter_quotes_it():
    chapters: dict[tuple[str, str], set[str]] = {}
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        chapters.update(_formats(nb.read_text(encoding="utf-8"), nb.stem))
    differ = [f"{page.name}: {chapter}::{key} as {sorted(fmts)}, the chapter as {sorted(chapters[chapter, key])}"
              for page in sorted((ROOT / "book").glob("*.md"))
              for (chapter, key), fmts in _formats(page.read_text(encoding="utf-8")).items()
              if (chapter, key) in chapters and not fmts <= chapters[chapter, key]]
    assert not differ, "one format per quantity: " + "; ".join(differ)


def _atlas_minus():
    """The book's Sphinx extension module (book/_ext is not a package)."""
    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import atlas_minus
    finally:
        sys.path.pop(0)
    return atlas_minus


def test_negative_numbers_in_prose_get_a_minus_sign():
    m = _atlas_minus().with_minus
    assert m("a z-score of -0.8 and [-0.005, +0.020]") == "a z-score of \u22120.8 and [\u22120.005, +0.020]"
    assert m("(-3.1)") == "(\u22123.1)"
    for kept in ("qwen2.5-coder-0.5b", "smollm2-135m", "GPT-2", "1e-7", "k = 4-10", "2026-12-02", "a/-1"):
        assert m(kept) == kept


def test_negative_numbers_in_glued_html_tables_get_a_minus_sign():
    """pandas HTML tables are raw output: only the text between tags changes, never a tag or code."""
    h = _atlas_minus().html_with_minus
    assert h('<td class="x-1">-0.007 [-0.028, +0.014]</td>') == '<td class="x-1">\u22120.007 [\u22120.028, +0.014]</td>'
    assert h("<th>k-1</th><td>qwen2.5-coder-0.5b</td>") == "<th>k-1</th><td>qwen2.5-coder-0.5b</td>"
    assert h("<pre>x = -1</pre><td>-2</td>") == "<pre>x = -1</pre><td>\u22122</td>"
    assert h('<code>-3</code> <span style="margin:-4px">-5</span>') == '<code>-3</code> <span style="margin:-4px">\u22125</span>'
