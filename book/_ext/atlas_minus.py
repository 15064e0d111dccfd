"""Sphinx extension: negative numbers in prose get a true minus sign (U+2212), as the math does.

A glued number is formatted by Python at build time ("-0.8"), while the same quantity written in math
renders with a minus ("−0.53"); side by side they read as two formats. This post-transform rewrites a
hyphen-minus that starts a number (not one inside a word, a range, an exponent or a model id such as
``qwen2.5-coder-0.5b``) in the page's text nodes. Code, literals, math and raw HTML are left alone.
"""

import re

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform

# a hyphen that begins a number: not after a word character, a dot, another hyphen or a slash
NEGATIVE = re.compile(r"(?<![\w.\-/−])-(?=\d)")
SKIP = (nodes.literal, nodes.literal_block, nodes.math, nodes.math_block, nodes.raw, nodes.FixedTextElement)


def with_minus(text: str) -> str:
    """``text`` with every hyphen-minus that starts a number replaced by U+2212 ("-0.8" → "−0.8")."""
    return NEGATIVE.sub("\u2212", text)


class MinusSigns(SphinxPostTransform):
    """Rewrite negative numbers in text nodes outside code, math and raw output."""

    default_priority = 900

    def run(self, **kwargs) -> None:
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
