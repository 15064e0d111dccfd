"""Open the rendered book in headless Chromium and check what a reader would see.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), so no driver package is needed, only Debian's
``chromium``. For every HTML page it checks that the page loads, every ``<img>`` decodes with a non-zero
size, MathJax typeset every math element without a TeX error, no glued value shows as missing
(empty, nan, None), nothing was requested from outside the book's folder, and the HTML names no resource
outside it (the book must work offline; hyperlinks such as a citation's DOI are allowed). The same session
prints pages to PDF (:meth:`Chromium.print_pdf`), which :mod:`atlas_core.book.pdf` assembles into the book's PDF
and checks.

What a reader of a figure needs is checked too, at the two widths the book is read at (``WIDTHS``: a laptop
and a phone; the viewport is set once per width, and only pages with tables are loaded again at the second):

- provenance: every figure and glued table (a ``<figure>`` of the article, or a glued table outside one) has
  its provenance line under the caption (``atlas_core.provenance.provenance_line``: it starts with
  ``PROVENANCE_MARK``), with a data link, and every link of the line resolves to a file of the built HTML
  (and to its anchor);
- table overflow: at every width, each table either fits or sits inside a box that scrolls sideways
  (``overflow-x: auto`` or ``scroll``): no box that does not scroll is wider inside than out (a clipped
  table), and no table or scrolling box reaches past the text column (under the right-hand contents sidebar
  at 1280 px, off the screen on a phone);
- figure scale: at the first width every figure image is drawn at ``MIN_FIGURE_SCALE`` or more of its natural
  width (an SVG's ``width`` attribute, 96 px per inch), so its labels keep the point size they were drawn at
  (``atlas_core.figures``);
- number formats: every page but the code appendix writes its intervals in the book's one format
  (``atlas_core.book.formats``: no "[lo to hi]", a × on both bounds of a ratio, a sign on every number of a
  signed interval, a minus sign rather than a hyphen).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from atlas_core.book.formats import format_problems

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install Debian's chromium package (apt-get install chromium), or set ATLAS_CHROMIUM"
# Offline flags: without the background-networking ones Chromium keeps trying to reach Google's hosts.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--allow-file-access-from-files", "--remote-debugging-pipe",
)
# What a missing or empty glued value looks like on the page (case matters: "none" is a word).
MISSING_VALUES = ("", "nan", "NaN", "None", "null", "undefined", "<NA>")

# The widths a page is checked at, in CSS px: a laptop (the theme's right-hand contents sidebar shown) and a
# phone. Figure scale is checked at the first.
WIDTHS = (1280, 420)
PHONE_MAX_PX = 600  # narrower viewports are emulated as mobile (the theme's phone layout)
VIEWPORT_HEIGHT_PX = 900
# The provenance line under a figure's or table's caption begins so (atlas_core.provenance.provenance_line).
PROVENANCE_MARK = "Source: chapter"
# A figure drawn below this share of its natural width shows its labels well under the point sizes it was drawn
# with (atlas_core.figures: sized to the text column at 100%), as the multi-panel figures found at 0.51-0.62.
MIN_FIGURE_SCALE = 0.9
EDGE_TOLERANCE_PX = 1  # sub-pixel layout rounding

# Runs inside each page once it has loaded: waits for MathJax, then reports what is on the page.
PAGE_PROBE = """
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));
  const math = Array.from(document.querySelectorAll('.math, span.math, div.math'));
  return {
    title: document.title,
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src,
                                                   width: i.naturalWidth, height: i.naturalHeight})),
    math: math.length,
    typeset: math.filter(m => m.querySelector('mjx-container')).length,
    math_errors: document.querySelectorAll('mjx-merror').length,
    mathjax: !!(window.MathJax && MathJax.version),
    glued: Array.from(document.querySelectorAll('.pasted-text, .pasted-inline'))
                .map(e => e.textContent.trim()),
    missing_refs: Array.from(document.querySelectorAll('.xref.problematic, .problematic'))
                .map(e => e.textContent.trim()),
  };
})()
"""

# Every figure of the article (glued figures and glued tables are wrapped in one) and every glued table outside
# one (an output that belongs to no notebook cell): its name, the provenance line's links, and each image's
# natural and drawn width. Run after PAGE_PROBE.
FIGURE_PROBE = """
((mark) => {
  const article = document.querySelector('.bd-article') || document.body;
  const named = (f, i, what) => {
    const number = f.querySelector('.caption-number');
    return number ? number.textContent.trim() : `${what} ${i + 1}` + (f.id ? ` (#${f.id})` : '');
  };
  const provenance = (box) => {
    const lines = Array.from(box.querySelectorAll('figcaption p'))
                       .filter(p => p.textContent.trim().startsWith(mark));
    const line = lines[lines.length - 1];
    if (!line) return null;
    return {data: Array.from(line.querySelectorAll('a[download], a.download')).map(a => a.href),
            links: Array.from(line.querySelectorAll('a[href]')).map(a => ({text: a.textContent.trim(),
                                                                           href: a.href}))};
  };
  const figures = Array.from(article.querySelectorAll('figure')).map((f, i) => ({
    name: named(f, i, 'figure'), provenance: provenance(f),
    images: Array.from(f.querySelectorAll('img')).map(img => ({
      src: img.currentSrc || img.src, natural: img.naturalWidth, drawn: img.getBoundingClientRect().width})),
  }));
  // A glued table pasted outside a figure (a {glue} directive): an output that is no notebook cell's.
  const loose = Array.from(article.querySelectorAll('.output, .pasted-block'))
                     .filter(b => b.querySelector('table') && !b.closest('figure, .cell') &&
                                  !b.parentElement.closest('.output, .pasted-block'))
                     .map((b, i) => ({name: `glued table ${i + 1} outside a figure`, provenance: null, images: []}));
  return figures.concat(loose);
})
"""

# Every visible table of the article at the current width: the box that holds it (the nearest ancestor that
# scrolls sideways, else the table), the first box that clips it, and where the text column ends (the
# article's right edge, the contents sidebar's left edge when it is shown, the viewport's edge).
TABLE_PROBE = """
(() => {
  const article = document.querySelector('.bd-article') || document.body;
  const side = document.querySelector('.bd-sidebar-secondary');
  const sideBox = side ? side.getBoundingClientRect() : null;
  const sideShown = !!sideBox && sideBox.width > 0 && getComputedStyle(side).visibility !== 'hidden';
  const edge = Math.min(article.getBoundingClientRect().right, sideShown ? sideBox.left : Infinity,
                        document.documentElement.clientWidth);
  const scrolls = s => s.overflowX === 'auto' || s.overflowX === 'scroll';
  const tables = Array.from(article.querySelectorAll('table')).map((t, i) => {
    const caption = t.querySelector('caption .caption-number') ||
                    (t.closest('figure') && t.closest('figure').querySelector('.caption-number'));
    const name = caption ? caption.textContent.trim() : `table ${i + 1}` + (t.id ? ` (#${t.id})` : '');
    let scroller = null, clipper = null;
    for (let e = t.parentElement; e && e !== document.documentElement; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (scrolls(s)) { scroller = e; break; }
      if (!clipper && s.overflowX !== 'visible' && e.scrollWidth > e.clientWidth + 1) {
        clipper = {box: e.tagName.toLowerCase(), width: e.clientWidth, overflow: s.overflowX};
      }
    }
    const box = (scroller || t).getBoundingClientRect();
    return {name, width: Math.round(t.getBoundingClientRect().width), right: Math.round(box.right),
            scrolls: !!scroller, clipper, shown: t.getBoundingClientRect().width > 0};
  }).filter(t => t.shown);
  return {edge: Math.round(edge), sidebar: sideShown ? Math.round(sideBox.left) : null, tables};
})()
"""


class BrowserError(RuntimeError):
    """Chromium is missing, failed to start, or stopped answering."""


@dataclass
class PageReport:
    """What one page showed; ``problems`` is empty when the page passed."""

    page: str
    images: int = 0
    math: int = 0
    glued: int = 0
    figures: int = 0
    tables: int = 0
    problems: list[str] = field(default_factory=list)


def find_chromium() -> str:
    """Path of a Chromium executable (``$ATLAS_CHROMIUM`` first), or raise with what to install."""
    candidates = [os.environ.get("ATLAS_CHROMIUM", "")] + [shutil.which(n) or "" for n in CHROMIUM_NAMES]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise BrowserError(f"no Chromium found; {INSTALL_HINT}")


def _pipe_fds(read_end: int, write_end: int) -> None:
    """In the child: put the command pipe on fd 3 and the reply pipe on fd 4 (the pipe protocol)."""
    import fcntl

    high_r, high_w = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10), fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
    os.dup2(high_r, 3)  # dup2 makes 3 and 4 inheritable; the originals close on exec
    os.dup2(high_w, 4)


class Chromium:
    """A headless Chromium with one page, driven over the DevTools pipe. Use as a context manager."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0):
        self.executable = executable
        self.timeout = timeout

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="atlas-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._proc = subprocess.Popen(
            [self.executable or find_chromium(), *FLAGS, f"--user-data-dir={self._profile}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=lambda: _pipe_fds(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self._events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable", session=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise BrowserError("Chromium stopped answering (timed out or exited)")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one DevTools command and return its result (events seen meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str) -> dict:
        """Block until an event named ``method`` arrives; returns its params."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(i).get("params", {})
            self._events.append(self._read_message(deadline))

    def set_width(self, width: int) -> None:
        """Emulate a viewport ``width`` CSS px wide (``VIEWPORT_HEIGHT_PX`` high, one device pixel per CSS px; a
        phone's layout below ``PHONE_MAX_PX``). It holds for every page opened after it."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=VIEWPORT_HEIGHT_PX,
                  deviceScaleFactor=1, mobile=width < PHONE_MAX_PX)

    def open(self, url: str) -> tuple[dict, list[str], list[str]]:
        """Load ``url``, run the page probe; returns (probe result, requested URLs, failed URLs)."""
        self._events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")
        probe = self.evaluate(PAGE_PROBE, f"page probe on {url}")
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in self._events
                if e.get("method") == "Network.requestWillBeSent"}
        # Only this page's requests: one left over from the previous page is aborted by the navigation.
        failed = [f"{urls[e['params']['requestId']]} ({e['params'].get('errorText', '?')})"
                  for e in self._events if e.get("method") == "Network.loadingFailed"
                  and e["params"]["requestId"] in urls]
        requested = list(urls.values())
        return probe, requested, failed

    def evaluate(self, expression: str, what: str = "script"):
        """Run ``expression`` in the page, await it if it is a promise, and return its value (JSON-like).

        Raises:
            BrowserError: the script threw (``what`` names it in the message), or Chromium stopped answering.
        """
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            reason = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{what} failed: {reason}")
        return result["result"].get("value")

    def print_pdf(self, **options) -> bytes:
        """The loaded page printed to PDF (DevTools ``Page.printToPDF``; ``options`` are its parameters:
        paper size and margins in inches, ``displayHeaderFooter``, header and footer templates...).

        Returns:
            The PDF file's bytes, printed with the page's print CSS (``@media print``).
        """
        import base64

        return base64.b64decode(self.call("Page.printToPDF", session=True, **options)["data"])


# Tags that make a browser load something, with an address outside the book (http:, https:, //host).
_EXTERNAL_TAG = re.compile(r'<(script|link|img|source|iframe|video|audio|embed)\b[^>]*?\b(?:src|href)='
                           r'["\']((?:https?:)?//[^"\']+)', re.IGNORECASE)
_INLINE_SCRIPT = re.compile(r"<script\b[^>]*>(.*?)</script>", re.IGNORECASE | re.DOTALL)
_URL = re.compile(r"https?://[^\s\"'<>]+")


# A redirect page (Jupyter Book's root index.html): <meta http-equiv="Refresh" content="0; url=book/intro.html">
_REFRESH = re.compile(r'<meta\s[^>]*http-equiv=["\']refresh["\'][^>]*content=["\']\s*\d+\s*;\s*url=([^"\']+)["\']',
                      re.IGNORECASE)


def redirect_target(html: str) -> str | None:
    """Where a meta-refresh redirect page sends the reader, or None for an ordinary page."""
    match = _REFRESH.search(html)
    return match.group(1).strip() if match else None


def _redirect_problems(page: Path, target: str) -> list[str]:
    """A redirect must stay inside the book and land on a page that exists."""
    if re.match(r"^(?:[a-z]+:)?//", target, re.IGNORECASE):
        return [f"redirects outside the book: {target}"]
    if not (page.parent / target.split("#")[0]).is_file():
        return [f"redirects to a missing page: {target}"]
    return []


def external_resources(html: str) -> list[str]:
    """Addresses outside the book that a page's HTML names as resources (tags or inline scripts).

    Hyperlinks (``<a href>``, such as a citation's DOI) are not resources and are not listed.
    """
    found = [match.group(2) for match in _EXTERNAL_TAG.finditer(html)]
    for body in _INLINE_SCRIPT.findall(html):
        found += _URL.findall(body)
    return found


def _page_problems(probe: dict, requested: list[str], failed: list[str]) -> list[str]:
    """Everything wrong with one loaded page, as readable lines (empty: the page passed)."""
    problems = [f"image not rendered: {img['src']}" for img in probe["images"]
                if not (img["width"] > 0 and img["height"] > 0)]
    if probe["math"] and not probe["mathjax"]:
        problems.append("MathJax did not load")
    if probe["typeset"] < probe["math"]:
        problems.append(f"{probe['math'] - probe['typeset']} of {probe['math']} math elements not typeset")
    if probe["math_errors"]:
        problems.append(f"{probe['math_errors']} TeX errors")
    problems += [f"glued value shows as {text!r}" for text in probe["glued"]
                 if text in MISSING_VALUES]
    problems += [f"unresolved reference {text!r}" for text in probe["missing_refs"]]
    problems += [f"external resource requested: {url}" for url in requested
                 if url.split(":", 1)[0] not in ("file", "data", "blob", "about")]
    problems += [f"resource failed to load: {why}" for why in failed]
    return problems


_SVG_WIDTH = re.compile(r'<svg\b[^>]*?(?<![\w-])width=["\']\s*([0-9.]+)\s*(px|pt|pc|in|cm|mm)?\s*["\']',
                        re.IGNORECASE)
PX_PER_UNIT = {"px": 1.0, "pt": 96 / 72, "pc": 16.0, "in": 96.0, "cm": 96 / 2.54, "mm": 96 / 25.4}


def svg_width_px(svg: str) -> float | None:
    """The width an SVG is drawn at when nothing scales it: its root element's ``width`` attribute in CSS px
    (96 per inch; matplotlib writes points), or None when it has none or a relative one (%, em).

    Args:
        svg: the SVG file's text (its start is enough).
    """
    match = _SVG_WIDTH.search(svg)
    return float(match.group(1)) * PX_PER_UNIT[(match.group(2) or "px").lower()] if match else None


def _local_file(url: str) -> tuple[Path, str] | None:
    """The file and fragment a ``file:`` address names; None for any other address (a web link)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    return (Path(unquote(parts.path)), unquote(parts.fragment)) if parts.scheme == "file" else None


def natural_width(image: dict) -> float:
    """An image's natural width in CSS px: an SVG file's ``width`` attribute (:func:`svg_width_px`), else what
    the browser decoded (``image`` as :data:`FIGURE_PROBE` reports it: ``src``, ``natural``, ``drawn``)."""
    local = _local_file(image["src"])
    if local and local[0].suffix.lower() == ".svg" and local[0].is_file():
        with local[0].open(encoding="utf-8", errors="replace") as f:
            width = svg_width_px(f.read(1 << 14))
        if width:
            return width
    return float(image["natural"])


def _link_problem(url: str, html_dir: Path, ids: dict[Path, str]) -> str | None:
    """Why a link of the built book leads nowhere (None: it resolves, or it is a web link). ``ids`` caches the
    text of the pages read for their anchors."""
    local = _local_file(url)
    if local is None:
        return None
    path, fragment = local
    if not path.resolve().is_relative_to(html_dir):
        return f"points outside the built HTML: {path}"
    if not path.is_file():
        return f"does not resolve: {path.relative_to(html_dir)} is not in the built HTML"
    if fragment and path.suffix == ".html":
        text = ids.setdefault(path, path.read_text(encoding="utf-8", errors="replace"))
        if not re.search(rf'\b(?:id|name)=["\']{re.escape(fragment)}["\']', text):
            return f"points to a missing anchor: {path.relative_to(html_dir)}#{fragment}"
    return None


def provenance_problems(figures: list[dict], html_dir: Path, ids: dict | None = None) -> list[str]:
    """Figures and glued tables without their provenance line, without a data link in it, or with a link of it
    that leads nowhere in the built HTML.

    Args:
        figures: what :data:`FIGURE_PROBE` reported for one page (name, provenance: data and links as ``file:``
            addresses, or None when the caption has no line starting with ``PROVENANCE_MARK``).
        html_dir: the built HTML folder (resolved); links must stay inside it.
        ids: a cache of page texts read for their anchors, shared between pages.

    Returns:
        One line per problem, naming the figure or table by its number ("Fig. 2", "Table 3").
    """
    ids = {} if ids is None else ids
    problems = []
    for figure in figures:
        line = figure["provenance"]
        if line is None:
            problems.append(f"{figure['name']} has no provenance line under its caption")
            continue
        if not line["data"]:
            problems.append(f"{figure['name']}: its provenance line has no data link")
        for link in line["links"]:
            why = _link_problem(link["href"], html_dir, ids)
            if why:
                problems.append(f"{figure['name']}: provenance link {link['text']!r} {why}")
    return problems


def scale_problems(figures: list[dict], width: int) -> list[str]:
    """Figure images drawn below ``MIN_FIGURE_SCALE`` of their natural width (:func:`natural_width`) at a
    viewport ``width`` CSS px wide; images not decoded or not shown are left to the other checks."""
    problems = []
    for figure in figures:
        for image in figure["images"]:
            natural, drawn = natural_width(image), image["drawn"]
            if natural > 0 and drawn > 0 and drawn < MIN_FIGURE_SCALE * natural:
                problems.append(f"{figure['name']} drawn at {drawn / natural:.2f} of its natural width at {width} px "
                                f"({drawn:.0f} of {natural:.0f} px): its labels shrink with it")
    return problems


def table_problems(probe: dict, width: int) -> list[str]:
    """Tables a reader cannot read whole at a viewport ``width`` CSS px wide: clipped by a box that does not
    scroll, or reaching past the text column (under the contents sidebar when it is shown).

    Args:
        probe: what :data:`TABLE_PROBE` reported for one page (edge and sidebar's left edge in CSS px, tables).
        width: the viewport's width, for the message.
    """
    problems = []
    for table in probe["tables"]:
        clip = table["clipper"]
        if clip:
            problems.append(f"{table['name']} clipped at {width} px: {table['width']} px wide in a {clip['width']} px "
                            f"<{clip['box']}> that does not scroll (overflow-x: {clip['overflow']})")
        elif table["right"] > probe["edge"] + EDGE_TOLERANCE_PX:
            sidebar = probe["sidebar"]
            where = ("runs under the right-hand contents sidebar" if sidebar is not None and table["right"] > sidebar
                     else "runs past the text column")
            box = "its scrolling box" if table["scrolls"] else "it"
            problems.append(f"{table['name']} {where} at {width} px: {box} ends at {table['right']} px, the column "
                            f"at {probe['edge']} px")
    return problems


def _first_look(browser: Chromium, page: Path, html_dir: Path, width: int, ids: dict) -> PageReport:
    """Open ``page`` at the first width and run every check on it."""
    name = str(page.relative_to(html_dir))
    html = page.read_text(encoding="utf-8", errors="replace")
    target = redirect_target(html)
    if target is not None:  # not loaded: it would navigate away while the probe runs
        return PageReport(page=name, problems=_redirect_problems(page, target))
    probe, requested, failed = browser.open(page.as_uri())
    figures = browser.evaluate(f"{FIGURE_PROBE}({json.dumps(PROVENANCE_MARK)})", f"figure probe on {name}")
    tables = browser.evaluate(TABLE_PROBE, f"table probe on {name}")
    problems = _page_problems(probe, requested, failed)
    problems += [f"names an external resource: {url}" for url in external_resources(html)]
    if "code" not in page.relative_to(html_dir).parts[:-1]:  # the code appendix's outputs are program text
        problems += format_problems(html)
    problems += provenance_problems(figures, html_dir, ids)
    problems += scale_problems(figures, width)
    problems += table_problems(tables, width)
    return PageReport(page=name, images=len(probe["images"]), math=probe["math"], glued=len(probe["glued"]),
                      figures=len(figures), tables=len(tables["tables"]), problems=problems)


def check_book(html_dir: Path | str, executable: str | None = None) -> list[PageReport]:
    """Open every page under ``html_dir`` in headless Chromium and report what each one showed.

    Every page is loaded once at the first of ``WIDTHS`` and checked there (see the module's docstring);
    pages with tables are loaded again at each other width for the table check alone.

    Args:
        html_dir: the built HTML folder (``_build/html``).
        executable: Chromium to use (default: :func:`find_chromium`).

    Returns:
        One :class:`PageReport` per page, in path order; the book passed when no report has problems.

    Raises:
        BrowserError: no Chromium, or it stopped answering.
        FileNotFoundError: ``html_dir`` holds no HTML page, or is not a Sphinx HTML build (no ``.buildinfo``):
            any other folder's pages (a home folder's, /tmp's) are not the book's and could be thousands.
    """
    html_dir = Path(html_dir).resolve()
    missing = FileNotFoundError(f"no HTML pages under {html_dir}: build the book first")
    if not html_dir.is_dir() or not any(html_dir.iterdir()):
        raise missing
    if not (html_dir / ".buildinfo").is_file():  # written by every Sphinx HTML build, Jupyter Book's included;
        # checked before the pages are listed: another folder's pages (/tmp's, a home's) could be thousands
        raise FileNotFoundError(f"{html_dir} is not a built book (no Sphinx .buildinfo there): give the _build/html "
                                "folder that `atlas book` (or `jupyter-book build`) wrote")
    pages = sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.parts)
    if not pages:
        raise missing
    first, *others = WIDTHS
    ids: dict[Path, str] = {}
    with Chromium(executable) as browser:
        browser.set_width(first)
        reports = [_first_look(browser, page, html_dir, first, ids) for page in pages]
        for width in others:
            browser.set_width(width)
            for page, report in zip(pages, reports):
                if report.tables:
                    browser.open(page.as_uri())
                    report.problems += table_problems(browser.evaluate(TABLE_PROBE, f"table probe on {report.page}"),
                                                      width)
    return reports


def summary(reports: list[PageReport]) -> str:
    """A short text report: totals, then each page with problems and what they are."""
    bad = [r for r in reports if r.problems]
    widths = " and ".join(str(w) for w in WIDTHS)
    lines = [f"browser check: {len(reports)} pages, {sum(r.images for r in reports)} images, "
             f"{sum(r.math for r in reports)} math elements, {sum(r.glued for r in reports)} glued "
             f"values, {sum(r.figures for r in reports)} figures and glued tables, "
             f"{sum(r.tables for r in reports)} tables at {widths} px: "
             f"{'all pass' if not bad else f'{len(bad)} pages with problems'}"]
    for report in bad:
        lines += [f"  {report.page}: {problem}" for problem in report.problems]
    return "\n".join(lines)
