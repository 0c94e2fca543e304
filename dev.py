#!/usr/bin/env python3
"""Project tasks, runnable on a fresh machine with only Python >= 3.11 and pip.

    python3 dev.py book                 # set up .venv, build the rendered book (_build/html/index.html)
    python3 dev.py test                 # set up .venv, run every test: pytest + nbval on all notebooks
    python3 dev.py sync [NOTEBOOK.md]   # re-execute notebooks and re-pair .md <-> .ipynb after an edit
    python3 dev.py notebook NAME        # re-execute one notebook (e.g. 01_kl_optimum)

Each task creates or reuses the virtual environment ``.venv``. On a machine without an NVIDIA
GPU it installs the CPU build of torch (torch==2.13.0) before anything else can pull a CUDA
build. Set REFIMPL_TORCH to override the torch requirement (e.g. "torch" on a GPU machine).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
NOTEBOOKS = ROOT / "notebooks"


def run(*cmd: str | Path, env: dict | None = None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def setup(extras: str = "book,test") -> None:
    """Create/reuse .venv; pin torch first; install refimpl with the given extras."""
    if sys.version_info < (3, 11):
        sys.exit("Python >= 3.11 is required")
    if not PY.exists():
        run(sys.executable, "-m", "venv", VENV)
        run(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    torch_req = os.environ.get("REFIMPL_TORCH") or ("torch" if shutil.which("nvidia-smi") else "torch==2.13.0")
    stamp = VENV / f".refimpl-{extras}-{torch_req}.stamp"
    pyproject = ROOT / "pyproject.toml"
    if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    run(PY, "-m", "pip", "install", "-q", torch_req)
    run(PY, "-m", "pip", "install", "-q", "-e", f".[{extras}]")
    run(PY, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    stamp.touch()


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("REFIMPL_CACHE", str(ROOT / ".cache" / "refimpl"))  # a fresh clone trains its own models
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("PYTHONHASHSEED", "0")
    e["PATH"] = str(PY.parent) + os.pathsep + e.get("PATH", "")
    return e


def book() -> None:
    setup()
    run(PY.parent / "jupyter-book", "build", ".", "-W", "--keep-going", env=env())
    print(f"book: {ROOT / '_build' / 'html' / 'index.html'}")


def test() -> None:
    setup()
    e = env()
    run(PY, "-m", "pytest", "tests", "-q", env=e)
    run(PY, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
        "--nbval-cell-timeout", "600", *sorted(map(str, NOTEBOOKS.glob("*.ipynb"))), env=e)


def execute(md: Path, e: dict) -> None:
    """Execute the .md source into its paired .ipynb (outputs included), then sync the pair."""
    run(PY, "-m", "jupytext", "--to", "ipynb", "--execute", "--set-kernel", "python3", md, env=e)
    run(PY, "-m", "jupytext", "--sync", md, env=e)


def sync(paths: list[str]) -> None:
    setup()
    e = env()
    mds = [Path(p) if p.endswith(".md") else NOTEBOOKS / f"{p}.md" for p in paths] or sorted(NOTEBOOKS.glob("*.md"))
    for md in mds:
        execute(md.resolve(), e)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {"book", "test", "sync", "notebook", "setup"}:
        sys.exit(__doc__)
    task, args = sys.argv[1], sys.argv[2:]
    if task == "book":
        book()
    elif task == "test":
        test()
    elif task == "setup":
        setup()
    else:
        sync(args)


if __name__ == "__main__":
    main()
