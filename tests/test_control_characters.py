"""No control characters in what the book renders: a ``\\text`` written inside a Python string
becomes a TAB followed by ``ext`` (``"\\text"`` is ``"\\t" + "ext"``), and MathJax then shows it as
``	ext``; a ``\\f`` becomes a form feed, ``\\b`` a backspace, ``\\v`` a vertical tab, ``\\a`` a bell.
Newlines are the only control character a page may hold."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # every C0 control and DEL, except the newline
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.md"))
PAGES = sorted((ROOT / "book").rglob("*.md"))


def _where(text: str) -> list[str]:
    """Each control character found, with the text around it (escaped)."""
    return [repr(text[max(0, m.start() - 30): m.end() + 10]) for m in CONTROL.finditer(text)]


def _rendered_text(nb: dict) -> str:
    """Markdown cells and the rendered (markdown, LaTeX, HTML) outputs of a notebook."""
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            for mime in ("text/markdown", "text/latex", "text/html"):
                parts.append("".join(out.get("data", {}).get(mime, "")))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=lambda p: p.name)
def test_sources_hold_no_control_characters(path):
    found = _where(path.read_text(encoding="utf-8"))
    assert not found, f"{path.name}: control characters (a \\t, \\f, \\b ... escape in a Python string?): {found}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_rendered_notebooks_hold_no_control_characters(path):
    found = _where(_rendered_text(json.loads(path.read_text(encoding="utf-8"))))
    assert not found, f"{path.name}: control characters in what the page renders: {found}"


def test_the_check_finds_a_tab_made_by_a_text_escape():
    assert _where("the rule $Q \\propto P \\cdot \\mathbb 1[" + "\text{allowed}]$")  # "\t" + "ext"
    assert not _where("$\\text{allowed}$\nnext line")
