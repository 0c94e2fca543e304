"""The built book as a reader sees it: every page opened in headless Chromium with the network cut off.

Run after `python3 dev.py book` (`.ci/run` does: `python3 dev.py browser`). Each page must render
all its math (MathJax served from the book itself, the book's macros defined), show no notebook
error or stderr output, have no broken image or internal link, and each chapter page must show
every figure its notebook holds. A screenshot of each chapter's first screen is saved under
`_build/screenshots/` for a person to look at.

Without Chromium the test is skipped (Debian/Ubuntu: `apt install chromium`), unless
REFIMPL_REQUIRE_BROWSER=1 (CI), where a missing browser or book is a failure.
"""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
REQUIRE = os.environ.get("REFIMPL_REQUIRE_BROWSER") == "1"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _skip_or_fail(msg: str):
    if REQUIRE:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> str:
    if not (HTML / "index.html").exists():
        _skip_or_fail("the book is not built: run `python3 dev.py book` first")
    exe = _chromium()
    if exe is None:
        _skip_or_fail("no Chromium found: install it (Debian/Ubuntu: `apt install chromium`) to check the rendered pages")
    return exe


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: everything must come from the book
         "--virtual-time-budget=20000", "--window-size=1280,900", "--hide-scrollbars"]


def _chrome(exe: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                             timeout=180)
    return out.stdout


class _Page(html.parser.HTMLParser):
    """What the checks need from a page's DOM: ids, links, images, math and output elements."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.images = set(), [], []
        self.math_total = self.math_rendered = self.merrors = 0
        self.errors, self.stderr, self.figures_in_outputs = [], 0, 0
        self._stack: list[tuple[str, set]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a.get("src", ""))
            if any("cell_output" in c for _, cs in self._stack for c in cs):
                self.figures_in_outputs += 1
        if "math" in cls and tag in ("span", "div"):
            self.math_total += 1
        if tag == "mjx-container" and any("math" in cs for _, cs in self._stack):
            self.math_rendered += 1
        if tag == "mjx-merror":
            self.merrors += 1
        if "traceback" in cls or "output_error" in cls:
            self.errors.append(tag)
        if "stderr" in cls and "output" in cls:
            self.stderr += 1
        if tag not in ("img", "br", "hr", "meta", "link", "input"):
            self._stack.append((tag, cls))

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break


def _pages() -> list[Path]:
    skip = {"search.html", "genindex.html", "py-modindex.html"}
    return sorted(p for p in HTML.rglob("*.html") if p.name not in skip and "_static" not in p.parts)


def _parse(exe: str, page: Path) -> _Page:
    p = _Page()
    p.feed(_chrome(exe, "--dump-dom", page.as_uri()))
    return p


def _notebook_figures(page: Path) -> int:
    nb = ROOT / page.relative_to(HTML).with_suffix(".ipynb")
    if not nb.exists():
        return 0
    cells = json.loads(nb.read_text())["cells"]
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


def test_every_page_renders(browser):
    pages = _pages()
    assert len(pages) >= 10, f"only {len(pages)} pages built"
    problems: list[str] = []
    cache: dict[Path, _Page] = {}

    def parsed(page: Path) -> _Page:
        if page not in cache:
            cache[page] = _parse(browser, page)
        return cache[page]

    for page in pages:
        rel = page.relative_to(HTML)
        raw = page.read_text()
        if 'http-equiv="Refresh"' in raw or "http-equiv='refresh'" in raw.lower():  # a redirect page
            target = raw.split("url=", 1)[1].split('"', 1)[0]
            if not (page.parent / target).exists():
                problems.append(f"{rel}: redirects to a missing page {target}")
            continue
        p = parsed(page)
        if p.math_rendered < p.math_total:
            problems.append(f"{rel}: {p.math_total - p.math_rendered} of {p.math_total} formulas left unrendered")
        if p.merrors:
            problems.append(f"{rel}: {p.merrors} MathJax errors (an undefined macro?)")
        if p.errors:
            problems.append(f"{rel}: notebook error output")
        if p.stderr:
            problems.append(f"{rel}: {p.stderr} stderr outputs (warnings) shown to the reader")
        for src in p.images:
            parts = urlsplit(src)
            if parts.scheme in ("http", "https"):
                problems.append(f"{rel}: image from the network: {src}")
            elif parts.scheme != "data":
                target = (page.parent / unquote(parts.path)).resolve()
                if not target.is_file() or target.stat().st_size == 0:
                    problems.append(f"{rel}: broken image {src}")
        for href in p.links:
            parts = urlsplit(href)
            if parts.scheme or href.startswith("//") or href.startswith("mailto:"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{rel}: broken link {href}")
            elif parts.fragment and target.suffix == ".html" and target in cache or \
                    (parts.fragment and target.suffix == ".html" and target.is_relative_to(HTML)):
                ids = parsed(target).ids if target in set(pages) else None
                if ids is not None and unquote(parts.fragment) not in ids:
                    problems.append(f"{rel}: link to a missing anchor {href}")
        expected = _notebook_figures(page)
        if p.figures_in_outputs < expected:
            problems.append(f"{rel}: shows {p.figures_in_outputs} of its notebook's {expected} figures")
    assert not problems, "\n".join(problems)


def test_math_uses_the_local_mathjax_and_the_books_macros(browser):
    page = HTML / "notebooks" / "01_kl_optimum.html"
    source = page.read_text()
    assert "cdn.jsdelivr.net" not in source and "_static/mathjax/tex-chtml.js" in source
    p = _parse(browser, page)
    assert p.math_total > 20 and p.math_rendered == p.math_total and p.merrors == 0


def test_chapter_screenshots(browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    for page in sorted((HTML / "notebooks").glob("*.html")):
        shot = SHOTS / f"{page.stem}.png"
        _chrome(browser, f"--screenshot={shot}", page.as_uri())
        assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {page.name}"
