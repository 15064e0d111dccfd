"""Sphinx extension: keep the HTML free of links to resources that need the network.

Jupyter Book 1 always loads sphinx-thebe, which writes the address of its JavaScript on a CDN into every
page (and fetches it only when a reader starts a live kernel, which this book does not offer). This
drops thebe's scripts from each page, so a page names no resource it cannot load offline.

It also loads the local MathJax on every page: Sphinx adds MathJax only to pages whose body has math, but
the contents sidebar on every page shows the chapter titles, and a title with math ("what sets $O_h$")
would stay raw TeX on the pages without (references, search, the appendix); the browser check fails them.
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
    app.set_html_assets_policy("always")  # MathJax (and every other asset) on every page: titles hold math
    app.connect("html-page-context", drop_thebe, priority=900)  # after other handlers add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
