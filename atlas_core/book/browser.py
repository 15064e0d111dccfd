"""Open the rendered book in headless Chromium and check what a reader would see.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), so no driver package is needed, only Debian's
``chromium``. For every HTML page it checks that the page loads, every ``<img>`` decodes with a non-zero
size, MathJax typeset every math element without a TeX error, no glued value shows as missing
(empty, nan, None), nothing was requested from outside the book's folder, and the HTML names no resource
outside it (the book must work offline; hyperlinks such as a citation's DOI are allowed). The same session
prints pages to PDF (:meth:`Chromium.print_pdf`), which :mod:`atlas_core.book.pdf` assembles into the book's PDF
and checks.
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


class BrowserError(RuntimeError):
    """Chromium is missing, failed to start, or stopped answering."""


@dataclass
class PageReport:
    """What one page showed; ``problems`` is empty when the page passed."""

    page: str
    images: int = 0
    math: int = 0
    glued: int = 0
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


def check_book(html_dir: Path | str, executable: str | None = None) -> list[PageReport]:
    """Open every page under ``html_dir`` in headless Chromium and report what each one showed.

    Args:
        html_dir: the built HTML folder (``_build/html``).
        executable: Chromium to use (default: :func:`find_chromium`).

    Returns:
        One :class:`PageReport` per page, in path order; the book passed when no report has problems.

    Raises:
        BrowserError: no Chromium, or it stopped answering.
        FileNotFoundError: ``html_dir`` holds no HTML page.
    """
    html_dir = Path(html_dir).resolve()
    pages = sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.parts)
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {html_dir}: build the book first")
    reports = []
    with Chromium(executable) as browser:
        for page in pages:
            html = page.read_text(encoding="utf-8", errors="replace")
            target = redirect_target(html)
            if target is not None:  # not loaded: it would navigate away while the probe runs
                reports.append(PageReport(page=str(page.relative_to(html_dir)),
                                          problems=_redirect_problems(page, target)))
                continue
            probe, requested, failed = browser.open(page.as_uri())
            problems = _page_problems(probe, requested, failed)
            problems += [f"names an external resource: {url}" for url in external_resources(html)]
            reports.append(PageReport(
                page=str(page.relative_to(html_dir)), images=len(probe["images"]), math=probe["math"],
                glued=len(probe["glued"]), problems=problems,
            ))
    return reports


def summary(reports: list[PageReport]) -> str:
    """A short text report: totals, then each page with problems and what they are."""
    bad = [r for r in reports if r.problems]
    lines = [f"browser check: {len(reports)} pages, {sum(r.images for r in reports)} images, "
             f"{sum(r.math for r in reports)} math elements, {sum(r.glued for r in reports)} glued "
             f"values: {'all pass' if not bad else f'{len(bad)} pages with problems'}"]
    for report in bad:
        lines += [f"  {report.page}: {problem}" for problem in report.problems]
    return "\n".join(lines)
