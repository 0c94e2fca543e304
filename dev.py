#!/usr/bin/env python3
"""Project tasks, runnable on a fresh machine with only Python >= 3.11 and pip.

    python3 dev.py test                 # set up .venv, run every test: pytest + nbval on all notebooks
    python3 dev.py book                 # set up .venv, build the rendered book (_build/html/index.html)
    python3 dev.py browser              # open every built page in headless Chromium and check it
    python3 dev.py notebooks [--other-blas]   # nbval on the notebooks only (optionally under other BLAS kernels)
    python3 dev.py sync [NOTEBOOK.md]   # re-execute notebooks, re-pair .md <-> .ipynb, record book/results/
    python3 dev.py models               # retrain the shipped models in models/ (minutes)
    python3 dev.py lowest               # the unit tests under the lowest versions pyproject.toml allows

Each task creates or reuses the virtual environment ``.venv``. On a machine without an NVIDIA
GPU it installs the CPU build of torch (torch==2.13.0) before anything else can pull a CUDA
build. Set REFIMPL_TORCH to override the torch requirement (e.g. "torch" on a GPU machine).
``lowest`` uses a second environment, ``.venv-lowest``, with each library of ``LOWEST`` pinned to
the lower bound that pyproject.toml declares for it (torch from PyPI: its CUDA build, which also
runs on a CPU).
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
NOTEBOOKS = ROOT / "notebooks"
# MathJax, served from the built book so formulas render without a network: the official npm
# package, fetched from the npm registry and checked against the registry's sha512 integrity.
MATHJAX_URL = "https://registry.npmjs.org/mathjax/-/mathjax-3.2.2.tgz"
MATHJAX_SHA512 = "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
MATHJAX_DIR = ROOT / "book" / "_static" / "mathjax"
# Other BLAS kernels for the second notebook pass of CI: on AVX-512 CPUs the first variable picks
# the AVX2 kernels; on others the second selects MKL's conditional-numerical-reproducibility path.
OTHER_BLAS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "COMPATIBLE"}
# `dev.py lowest`: these libraries are installed at the lower bound (">=X") that pyproject.toml
# declares for them (the core dependencies and the test extra's peft and TRL: what refimpl's code
# calls); the test tools resolve freely. A name without such a bound there is an error.
LOWEST = ("torch", "transformers", "tokenizers", "tqdm", "scipy", "pyyaml", "numpy", "peft", "trl")
VENV_LOWEST = ROOT / ".venv-lowest"


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


def lowest_pins() -> list[str]:
    """``name==X`` for each library of ``LOWEST``, X its ">=X" bound in pyproject.toml."""
    import tomllib  # Python >= 3.11

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = []
    for name in LOWEST:
        found = [m[1] for r in reqs if (m := re.fullmatch(rf"{name}\s*>=\s*([\w.]+)\s*(,.*)?", r.strip()))]
        if len(found) != 1:
            sys.exit(f"pyproject.toml declares no single '{name}>=X' bound (dependencies or the test extra)")
        pins.append(f"{name}=={found[0]}")
    return pins


def lowest() -> None:
    """The unit tests (not the notebooks) in .venv-lowest, every library of LOWEST at its lowest."""
    py = VENV_LOWEST / PY.relative_to(VENV)
    if not py.exists():
        run(sys.executable, "-m", "venv", VENV_LOWEST)
        run(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    pins = lowest_pins()
    stamp = VENV_LOWEST / f".refimpl-{'-'.join(pins)}.stamp"
    if not (stamp.exists() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime):
        constraints = VENV_LOWEST / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        run(py, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager",
            "--constraint", constraints, "-e", ".[test]")
        stamp.touch()
    print("lowest:", ", ".join(pins), flush=True)
    e = env({"PATH": str(py.parent) + os.pathsep + os.environ.get("PATH", ""),
             "REFIMPL_CACHE": str(VENV_LOWEST / "refimpl-cache"),  # models trained here stay here
             "REFIMPL_REQUIRE_OPTIONAL": "1"})  # TRL, datasets and peft must import: a skip would hide a failure
    run(py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", env=e)


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e.setdefault("REFIMPL_CACHE", str(ROOT / ".cache" / "refimpl"))  # full-scale models are trained here
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("PYTHONHASHSEED", "0")
    e["PATH"] = str(PY.parent) + os.pathsep + e.get("PATH", "")
    return e | (extra or {})


def fetch_mathjax() -> None:
    """Put MathJax 3 (its es5 bundle and fonts) into book/_static/mathjax, once."""
    if (MATHJAX_DIR / "tex-chtml.js").exists():
        return
    print(f"+ fetch {MATHJAX_URL}", flush=True)
    data = urllib.request.urlopen(MATHJAX_URL, timeout=120).read()
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != MATHJAX_SHA512:
        sys.exit("MathJax download does not match the npm registry's sha512 integrity: refusing to use it")
    tmp = MATHJAX_DIR.with_name("mathjax.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("package/es5/"):
                target = tmp / member.name.removeprefix("package/es5/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    shutil.rmtree(MATHJAX_DIR, ignore_errors=True)
    os.replace(tmp, MATHJAX_DIR)


def book() -> None:
    setup()
    fetch_mathjax()
    run(PY.parent / "jupyter-book", "build", ".", "-W", "--keep-going", env=env())
    print(f"book: {ROOT / '_build' / 'html' / 'index.html'} (offline: open it, or "
          f"`python3 -m http.server -d _build/html` and visit http://localhost:8000)")


def notebooks(other_blas: bool = False) -> None:
    """nbval on every notebook: checked cells must reproduce their printed outputs, and every
    check against the committed reference and every claim must hold."""
    setup()
    extra = OTHER_BLAS if other_blas else {}
    if other_blas:
        probe = "import torch, hashlib; torch.manual_seed(0); a = torch.randn(256, 512); b = torch.randn(512, 300); " \
                "print(hashlib.md5((a @ b).numpy().tobytes()).hexdigest())"
        out = [subprocess.run([str(PY), "-c", probe], capture_output=True, text=True, env=env(e)).stdout
               for e in ({}, extra)]
        print(f"other BLAS kernels {extra}: float32 matmul bits {'differ' if out[0] != out[1] else 'DO NOT differ'} "
              "from the default on this CPU", flush=True)
    # two notebooks at a time, each in its own kernel on one core (--dist loadfile keeps a notebook's
    # cells in order on one worker); the chapters run their tiny models on one thread
    run(PY, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-n", "2",
        "--dist", "loadfile", "--nbval-cell-timeout", "900", *sorted(map(str, NOTEBOOKS.glob("*.ipynb"))),
        env=env(extra))


def test() -> None:
    setup()
    run(PY, "-m", "pytest", "tests", "-q", env=env({"REFIMPL_REQUIRE_OPTIONAL": "1"}))
    notebooks()


def browser() -> None:
    """Open every page of the built book in headless Chromium and check what a reader sees."""
    setup()
    run(PY, "-m", "pytest", "tests/test_rendered_book.py", "-q", "-p", "no:cacheprovider",
        env=env({"REFIMPL_REQUIRE_BROWSER": "1"}))


def sync(paths: list[str]) -> None:
    """Execute each chapter into its .ipynb while recording its numbers and claims into
    book/results/smoke-cpu (the reference the tests compare with), then re-pair and re-render."""
    setup()
    results = ROOT / "book" / "results" / "smoke-cpu"
    e = env({"REFIMPL_RESULTS": str(results), "REFIMPL_SCALE": "smoke"})
    mds = [Path(p) if p.endswith(".md") else NOTEBOOKS / f"{p}.md" for p in paths] or sorted(NOTEBOOKS.glob("*.md"))
    for md in mds:
        md = md.resolve()
        run(PY, "-m", "jupytext", "--to", "ipynb", "--execute", "--set-kernel", "python3", md, env=e)
        run(PY, "-m", "jupytext", "--sync", md, env=e)
    run(PY, "scripts/run_scale.py", "--from-notebooks", *[md.stem for md in mds], env=e)


def models() -> None:
    setup()
    run(PY, "scripts/ship_models.py", *sys.argv[2:], env=env())


TASKS = {"book": book, "test": test, "browser": browser, "setup": setup, "models": models, "lowest": lowest}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in {*TASKS, "sync", "notebooks"}:
        sys.exit(__doc__)
    task, args = sys.argv[1], sys.argv[2:]
    if task == "sync":
        sync(args)
    elif task == "notebooks":
        notebooks(other_blas="--other-blas" in args)
    else:
        TASKS[task]()


if __name__ == "__main__":
    main()
