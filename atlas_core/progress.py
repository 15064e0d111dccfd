"""Progress bars that name the chapter they belong to.

The workflow runs several chapters at once, so a bare "perplexity 3/8" does not say whose bar it is. The
runner puts the chapter (and its model) in ``$ATLAS_CHAPTER`` for the notebook's kernel; every bar of the
library is made by :class:`tqdm` here, which prefixes its description with that label. Outside a chapter
run (a test, the ``atlas`` command) the variable is unset and descriptions are unchanged.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm as _tqdm

CHAPTER_ENV = "ATLAS_CHAPTER"

__all__ = ["CHAPTER_ENV", "chapter_label", "label", "tqdm"]


def chapter_label(chapter: str, model: str) -> str:
    """The label the runner sets for one (chapter, model) run, e.g. ``"kvquant [smollm2-135m]"``."""
    return f"{chapter} [{model}]"


def label(desc: str | None) -> str:
    """``desc`` prefixed with the running chapter's label (``$ATLAS_CHAPTER``), if any.

    Args:
        desc: the bar's own description (may be empty or None).
    Returns:
        ``"<chapter label>: <desc>"``, the label alone for an empty ``desc``, or ``desc`` when no chapter runs.
    """
    prefix = os.environ.get(CHAPTER_ENV, "").strip()
    desc = desc or ""
    if not prefix:
        return desc
    return f"{prefix}: {desc}" if desc else prefix


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.auto.tqdm)
    """``tqdm.auto.tqdm`` whose description names the running chapter (see :func:`label`)."""

    def __init__(self, iterable=None, desc=None, *args, **kwargs):
        super().__init__(iterable, label(desc), *args, **kwargs)
