"""Sphinx extension: the references list in author–year form, as the in-text citations are.

The text cites author–year (``bibtex_reference_style: author_year``), but sphinxcontrib-bibtex labels the
list with pybtex's default "alpha" style ("[RW26]"), so a reader cannot find "Ruiz Williams (2026)" in it.
This registers the pybtex formatting style ``atlas_author_year`` (``bibtex_default_style`` in
``_config.yml``): pybtex's plain ("unsrt") entries, labelled "Ruiz Williams 2026" (one author's last
name, "A and B" for two, "A et al." for more; "2026a", "2026b" where two labels would clash) and sorted
by author, year and title.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from string import ascii_lowercase

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle

STYLE = "atlas_author_year"


def _last_name(person) -> str:
    """A person's last name with any prefix ("van der"), LaTeX accents rendered as text."""
    return " ".join(part.render_as("text") for part in person.rich_prelast_names + person.rich_last_names)


def author_year(entry) -> str:
    """"Author Year" of one entry: its authors (or editors) as the text cites them, and its year."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(p) for p in persons]
    if names and names[-1] == "others":  # BibTeX's "and others": the list is longer than written
        names = names[:-1] + ["", ""]
    who = (entry.key if not names else names[0] if len(names) == 1 else " and ".join(names) if len(names) == 2
           else f"{names[0]} et al.")
    return f"{who} {entry.fields.get('year', 'n.d.')}"


def _fold(text: str) -> str:
    """Lower case without accents or braces, for sorting ("Ré" beside "Re", not after "Z")."""
    plain = unicodedata.normalize("NFKD", text.replace("{", "").replace("}", ""))
    return "".join(c for c in plain if not unicodedata.combining(c)).lower()


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Author Year", with a letter after the year where two entries would share a label."""

    def format_labels(self, sorted_entries):
        labels = [author_year(e) for e in sorted_entries]
        clashes, seen = Counter(labels), Counter()
        for label in labels:
            if clashes[label] > 1:
                seen[label] += 1
                yield label + ascii_lowercase[seen[label] - 1]
            else:
                yield label


class AuthorYearSorting(BaseSortingStyle):
    """Entries in the order of their labels ("Author Year", accents folded, braces ignored), then title."""

    def sorting_key(self, entry):
        return tuple(_fold(text) for text in (author_year(entry), entry.fields.get("title", "")))


class AuthorYearStyle(UnsrtStyle):
    """pybtex's plain entries with author–year labels, sorted by author, year and title."""

    default_label_style = AuthorYearLabels
    default_sorting_style = AuthorYearSorting


def setup(app):
    register_plugin("pybtex.style.formatting", STYLE, AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
