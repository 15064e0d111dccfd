"""Sphinx extension: keep the HTML free of links to resources that need the network.

Jupyter Book 1 always loads sphinx-thebe, which writes the address of its JavaScript on a CDN into every
page (and fetches it only when a reader starts a live kernel, which this book does not offer). This
drops thebe's scripts from each page, so a page names no resource it cannot load offline.
"""

THEBE_MARKERS = ("unpkg.com/thebe", "sphinx-thebe.js", "THEBE_JS_URL")


def _is_thebe(script) -> bool:
    text = " ".join([str(getattr(script, "filename", "") or script),
                     str(getattr(script, "attributes", {}).get("body", ""))])
    return any(marker in text for marker in THEBE_MARKERS)


def drop_thebe(app, pagename, templatename, context, doctree) -> None:
    """``html-page-context`` handler: remove thebe's script entries from the page's scripts."""
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [s for s in scripts if not _is_thebe(s)]


def setup(app):
    app.connect("html-page-context", drop_thebe, priority=900)  # after other handlers add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
