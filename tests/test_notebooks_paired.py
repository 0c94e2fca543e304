"""Every chapter's MyST source and its .ipynb (which carries the outputs) hold the same cells."""
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.md"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("md", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(md):
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `python3 dev.py sync {md.name}`"
    a, b = jupytext.read(md), jupytext.read(ipynb)
    assert _cells(a) == _cells(b), f"{md.name} and {ipynb.name} differ: run `python3 dev.py sync notebooks/{md.name}`"
    code = [c for c in b.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{ipynb.name} has unexecuted cells"
