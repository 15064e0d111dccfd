"""The book's number-format check on built pages: every interval in the one format of Methods ("Number formats").

``interval.interval_text`` writes every interval a chapter computes; this check reads what the reader sees
(a page's text, outside code, math and scripts) and names what slipped past it: an interval written
"[lo to hi]", a ratio whose bounds lack the ×, a signed interval with an unsigned bound ("−0.050 [−0.247,
0.154]"), and a hyphen-minus where a minus sign belongs ("[-0.028"; ``book/_ext/atlas_minus.py`` writes U+2212
in prose and in glued tables). The browser check runs it on every page except the code appendix, whose
outputs are program text.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

NUMBER = r"[-+−]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?"
TO_IN_BRACKETS = re.compile(rf"\[\s*{NUMBER}\s+to\s+{NUMBER}\s*\]")
RATIO = re.compile(rf"({NUMBER})×\s*\[\s*({NUMBER})(×?)\s*,\s*({NUMBER})(×?)\s*\]")
INTERVAL = re.compile(rf"(?<![\w.])({NUMBER})\s*\[\s*({NUMBER})\s*,\s*({NUMBER})\s*\]")
HYPHEN_MINUS = re.compile(r"(?<![\w.\-/−])-(?=\d)")  # as atlas_minus.NEGATIVE: a hyphen that begins a number
SKIP_TAGS = {"pre", "code", "script", "style", "math", "svg", "kbd", "samp", "mjx-container"}
SKIP_CLASSES = ("math", "highlight", "cell_input")
BLOCKS = {"p", "li", "td", "th", "div", "h1", "h2", "h3", "h4", "h5", "h6", "caption", "figcaption", "dt", "dd",
          "section", "table", "tr", "ul", "ol", "blockquote", "aside", "article", "header", "footer", "nav"}
VOID = {"br", "img", "meta", "link", "input", "hr", "wbr", "col", "source", "area", "base", "embed", "param",
        "track"}


class _Text(HTMLParser):
    """The text of each block element of a page, outside code, math and scripts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._stack: list[tuple[str, bool]] = []
        self._buffer: list[str] = []

    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.blocks.append(text)
        self._buffer = []

    def handle_starttag(self, tag, attrs):
        if tag in BLOCKS:
            self._flush()
        if tag in VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        skip = self._skipping() or tag in SKIP_TAGS or any(c in SKIP_CLASSES for c in classes)
        self._stack.append((tag, skip))

    def handle_endtag(self, tag):
        if tag in BLOCKS:
            self._flush()
        for i in range(len(self._stack) - 1, -1, -1):  # close the nearest open element of this name
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data):
        if not self._skipping():
            self._buffer.append(data)

    def close(self):
        super().close()
        self._flush()


def text_blocks(html: str) -> list[str]:
    """The whitespace-normalised text of each block element of ``html`` (paragraphs, cells, captions, list
    items), without code, math, scripts or notebook cell inputs and outputs."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser.blocks


def _signed(text: str) -> bool:
    return text[0] in "+-−"


def _zero(text: str) -> bool:
    return not re.search(r"[1-9]", text.split("e")[0])


def format_problems(html: str) -> list[str]:
    """What in a page's text breaks the book's number formats, one line each (empty: none).

    Args:
        html: one built page.
    Returns:
        lines such as "interval written with 'to': 16,476 [12,048 to 23,392]", "ratio bounds without ×: 1.43×
        [1.05, 1.61]", "signed interval with an unsigned bound: −0.050 [−0.247, 0.154]" and "hyphen-minus for a
        minus sign: …[-0.028, +0.014]…"; each distinct text once.
    """
    found: dict[str, None] = {}
    for block in text_blocks(html):
        for m in TO_IN_BRACKETS.finditer(block):
            found[f"interval written with 'to': {block[max(0, m.start() - 12):m.end()]}"] = None
        for m in RATIO.finditer(block):
            if not (m.group(3) and m.group(5)):
                found[f"ratio bounds without ×: {m.group(0)}"] = None
        for m in INTERVAL.finditer(block):
            numbers = m.groups()
            if any(n[0] in "-−" for n in numbers) and not all(_signed(n) or _zero(n) for n in numbers):
                found[f"signed interval with an unsigned bound: {m.group(0)}"] = None
        for m in HYPHEN_MINUS.finditer(block):
            found[f"hyphen-minus for a minus sign: …{block[max(0, m.start() - 20):m.start() + 20]}…"] = None
    return list(found)
