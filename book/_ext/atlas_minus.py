"""Sphinx extension: negative numbers in prose get a true minus sign (U+2212), as the math does.

A glued number is formatted by Python at build time ("-0.8"), while the same quantity written in math
renders with a minus ("−0.53"); side by side they read as two formats. This post-transform rewrites a
hyphen-minus that starts a number (not one inside a word, a range, an exponent or a model id such as
``qwen2.5-coder-0.5b``) in the page's text nodes, and in the text of raw HTML output (the tables a chapter
glues are pandas HTML): only between tags, never in a tag, and not inside ``<code>``, ``<pre>``, ``<script>``,
``<style>`` or ``<math>``. Code, literals and math are left alone.
"""

import re

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform

# a hyphen that begins a number: not after a word character, a dot, another hyphen or a slash
NEGATIVE = re.compile(r"(?<![\w.\-/−])-(?=\d)")
SKIP = (nodes.literal, nodes.literal_block, nodes.math, nodes.math_block, nodes.raw, nodes.FixedTextElement)
TAG = re.compile(r"(<[^>]*>)")  # a tag, kept whole by re.split
VERBATIM = re.compile(r"<(/?)(code|pre|script|style|math)\b", re.I)


def with_minus(text: str) -> str:
    """``text`` with every hyphen-minus that starts a number replaced by U+2212 ("-0.8" → "−0.8")."""
    return NEGATIVE.sub("\u2212", text)


def html_with_minus(html: str) -> str:
    """``with_minus`` on the text between the tags of ``html``; tags and verbatim elements are kept as they are.

    ``<td>-0.007 [-0.028, +0.014]</td>`` → ``<td>−0.007 [−0.028, +0.014]</td>``.
    """
    parts, depth = TAG.split(html), 0
    for i, part in enumerate(parts):
        if i % 2:  # a tag: count how deep we are inside verbatim elements
            opened = VERBATIM.match(part)
            if opened and not part.endswith("/>"):
                depth = max(0, depth - 1) if opened.group(1) else depth + 1
        elif depth == 0:
            parts[i] = with_minus(part)
    return "".join(parts)


class MinusSigns(SphinxPostTransform):
    """Rewrite negative numbers in text nodes outside code, math and raw output."""

    default_priority = 900

    def run(self, **kwargs) -> None:
        for raw in list(self.document.findall(nodes.raw)):  # glued tables: pandas HTML
            if "html" in raw.get("format", "").split() and not any(isinstance(a, SKIP[:-2]) for a in _ancestors(raw.parent)):
                html = raw.astext()
                new = html_with_minus(html)
                if new != html:
                    raw.replace_self(nodes.raw("", new, format=raw["format"]))
        for text in list(self.document.findall(nodes.Text)):
            parent = text.parent
            if parent is None or isinstance(parent, SKIP) or any(isinstance(a, SKIP) for a in _ancestors(parent)):
                continue
            new = with_minus(str(text))
            if new != str(text):
                parent.replace(text, nodes.Text(new))


def _ancestors(node):
    while node is not None:
        yield node
        node = node.parent


def setup(app):
    app.add_post_transform(MinusSigns)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
