"""Run every chapter at one scale and write its results under ``book/results/<scale>-<device>/``.

    python scripts/run_scale.py --scale smoke            # CPU, about 5 minutes
    python scripts/run_scale.py --scale full             # a GPU: the "Results at scale" page
    python scripts/run_scale.py --render                 # only rewrite book/results/summary.md
    python scripts/run_scale.py --scale full --dry-run   # the full scale's code with a tiny model, on CPU

Each chapter's notebook is converted to a plain script (``--prepare`` does only that, with
jupytext, for a machine without the Jupyter stack: carry ``build/scale-scripts/`` there) and run
in its own process with ``$REFIMPL_RESULTS`` set, so the chapter's :class:`refimpl.report.Report`
writes its numbers and claims to ``<chapter>.json``; every figure the chapter shows is saved as
``<chapter>-fig<N>.png`` and its printed output as ``<chapter>.log``. ``run.json`` records the
device, the versions, the date and the wall times. The toy models are trained (or found in the
cache) first, and timed on their own.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_page, beside this script


def chapters_from_toc(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """The notebook chapters, in the book's order: every ``file: notebooks/<name>`` entry of _toc.yml."""
    import yaml

    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            f = node.get("file")
            if isinstance(f, str) and f.startswith("notebooks/"):
                found.append(f.split("/", 1)[1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(toc.read_text()))
    return found


CHAPTERS = chapters_from_toc()
SCRIPTS = ROOT / "build" / "scale-scripts"
RESULTS = ROOT / "book" / "results"
DRY_RUN = ROOT / "build" / "dry-run"
# --dry-run: the scale's sample counts and chunkings with a tiny, briefly trained model and few seeds,
# to catch shape errors in minutes before a long run (its numbers mean nothing). Device errors show
# only on the device: on a GPU machine, dry-run there first (it also exercises the GPU pretraining).
DRY_SIZES = "arith_layers=2,arith_width=64,arith_heads=2,arith_steps=300,arith_batch=64,seeds=2,rl_steps=6,rl_seeds=2"

# Runs in the chapter's process: save each figure the chapter shows, then run the chapter.
BOOTSTRAP = """
import runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, chapter, script = sys.argv[1:4]
count = [0]
def show(*args, **kwargs):
    for num in plt.get_fignums():
        count[0] += 1
        plt.figure(num).savefig(f"{out}/{chapter}-fig{count[0]}.png", dpi=90, bbox_inches="tight")
    plt.close("all")
plt.show = show
runpy.run_path(script, run_name="__main__")
show()  # figures the chapter drew but did not show
"""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file or
    the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_hash(chapter: str) -> str:
    return hashlib.sha256((ROOT / "notebooks" / f"{chapter}.md").read_bytes()).hexdigest()[:16]


def prepare(chapters: list[str]) -> None:
    """Convert ``notebooks/<chapter>.md`` to ``build/scale-scripts/<chapter>.py`` with jupytext; the
    script's first line records the source's hash, so a stale script is refused."""
    SCRIPTS.mkdir(parents=True, exist_ok=True)
    for ch in chapters:
        path = SCRIPTS / f"{ch}.py"
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "py:percent", "-o", str(path),
                        str(ROOT / "notebooks" / f"{ch}.md")], check=True)
        path.write_text(f"# source sha256: {source_hash(ch)}\n" + path.read_text())


def chapter_script(chapter: str) -> Path:
    """The prepared script of ``chapter``, checked against the notebook it was made from."""
    path = SCRIPTS / f"{chapter}.py"
    if not path.exists():
        raise FileNotFoundError(f"build/scale-scripts/{path.name} is missing: run --prepare where jupytext is installed")
    if path.read_text().splitlines()[0] != f"# source sha256: {source_hash(chapter)}":
        raise RuntimeError(f"build/scale-scripts/{path.name} is stale (notebooks/{chapter}.md changed): run --prepare again")
    return path


def scrub(text: str) -> str:
    """Replace this machine's paths (repository, Python prefix, home) in a log with placeholders."""
    pairs = [(str(ROOT), "<repo>"), (sys.prefix, "<python>"), (sys.base_prefix, "<python>"), (str(Path.home()), "~")]
    for path, name in sorted(pairs, key=lambda p: -len(p[0])):  # the longest first: a venv inside the repo
        if len(path) > 1:  # never "/"
            text = text.replace(path, name)
    return text


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"1 × {torch.cuda.get_device_name(device)}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def git_commit() -> str | None:
    """The commit, with ``-dirty`` when the code or the chapters differ from it (results do not count)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "refimpl", "notebooks", "scripts", "pyproject.toml")
        return (head + ("-dirty" if dirty else "")) or None
    except OSError:
        return None


def open_record(scale, device, chapters: list[str], command: str, models_wall: float, results: Path = RESULTS,
                keep_json: bool = False):
    """The results folder of (scale, device) and its run record, ready to receive ``chapters``.

    A run of some chapters updates theirs and keeps the others' entries, but only if the rest of the
    folder came from the same setting (device, versions, sizes); otherwise it starts afresh. The
    redone chapters' old figures and logs are removed (and their results, unless ``keep_json``:
    already written by the run being filed).

    Returns:
        ``(folder, record, save)``; ``save()`` writes ``run.json`` atomically.
    """
    out = results / f"{scale.name}-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"scale": scale.name, "sizes": dataclasses.asdict(scale), "device": device_name(device),
              "versions": versions(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
              "command": command, "models_wall_s": round(models_wall, 1), "chapters": {}}
    old = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    same = all(old.get(key) == record[key] for key in ("scale", "sizes", "device", "versions"))
    if same:
        record["models_wall_s"] = max(record["models_wall_s"], old.get("models_wall_s", 0.0))
        record["chapters"] = {ch: c for ch, c in old.get("chapters", {}).items() if ch not in chapters}
    kept = set(record["chapters"])  # the other chapters' files stay; those of ``chapters`` are redone
    for stale in [*out.glob("*.json"), *out.glob("*.png"), *out.glob("*.log")]:
        chapter = stale.stem.split("-fig")[0]
        if stale.name == "run.json" or chapter in kept or (keep_json and stale.suffix == ".json" and chapter in chapters):
            continue
        stale.unlink()

    def save():
        record["chapters"] = {c: record["chapters"][c] for c in CHAPTERS if c in record["chapters"]}
        write_atomic(out / "run.json", json.dumps(record, indent=1) + "\n")

    return out, record, save


def report_claims(out: Path, chapter: str) -> None:
    """Print the claims of ``chapter`` that did not hold (from its results file)."""
    if (out / f"{chapter}.json").exists():
        for c in json.loads((out / f"{chapter}.json").read_text())["claims"]:
            if not c["holds"]:
                print(f"  CLAIM DOES NOT HOLD: {c['claim']} {c['numbers']}", flush=True)


def run(scale_name: str, chapters: list[str], command: str, results: Path = RESULTS) -> tuple[Path, bool]:
    """Train the toy models, run ``chapters`` as scripts; return the results folder and whether all
    succeeded."""
    import torch

    from refimpl import config, models

    config.quiet()
    scale = config.get_scale(scale_name)
    device = config.device(scale)
    scripts = {ch: chapter_script(ch) for ch in chapters}  # fail now, not after training the models
    t0 = time.perf_counter()
    for name in models.TOY_MODELS:
        models.toy_model_path(name, scale)
    models_wall = time.perf_counter() - t0
    print(f"toy models ready in {models_wall:.0f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the chapters run in other processes: hand the memory back
    out, record, save = open_record(scale, device, chapters, command, models_wall, results)
    env = dict(os.environ, REFIMPL_SCALE=scale.name, REFIMPL_RESULTS=str(out), MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for ch in chapters:
        # Marked as running first: a run killed here leaves "running", never an old "ok".
        record["chapters"][ch] = {"wall_s": 0.0, "status": "running", "date": record["date"],
                                  "commit": record["commit"]}
        save()
        t0 = time.perf_counter()
        rel = os.path.relpath(scripts[ch], ROOT / "notebooks")
        proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(out), ch, rel], env=env, text=True,
                              cwd=ROOT / "notebooks", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        write_atomic(out / f"{ch}.log", scrub(proc.stdout))  # no machine paths in committed logs
        wall = time.perf_counter() - t0
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        record["chapters"][ch].update(wall_s=round(wall, 1), status=status)
        save()
        print(f"{ch}: {status} in {wall:.0f} s", flush=True)
        report_claims(out, ch)
    return out, all(record["chapters"][ch]["status"] == "ok" for ch in chapters)


def from_notebooks(chapters: list[str]) -> Path:
    """File the executed notebooks ``notebooks/<chapter>.ipynb`` (``dev.py sync``, which records
    their numbers and claims while executing them) as the smoke-scale CPU results: their figures as
    PNGs, their printed output as the log, their execution time in ``run.json``."""
    import nbformat

    from refimpl import config

    scale = config.get_scale("smoke")
    out, record, save = open_record(scale, config.device(scale), chapters, "python3 dev.py sync", 0.0, keep_json=True)
    for ch in chapters:
        nb = nbformat.read(ROOT / "notebooks" / f"{ch}.ipynb", as_version=4)
        figures, log, times = 0, [], []
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            ex = cell.metadata.get("execution", {})
            times += [ex[k] for k in ("iopub.execute_input", "shell.execute_reply") if k in ex]
            for o in cell.get("outputs", []):
                data = o.get("data", {})
                if "image/png" in data:
                    figures += 1
                    (out / f"{ch}-fig{figures}.png").write_bytes(base64.b64decode(data["image/png"]))
                elif o.get("output_type") == "stream":
                    log.append(o["text"])
                elif "text/plain" in data:
                    log.append(data["text/plain"] + "\n")
                elif o.get("output_type") == "error":
                    log.append("\n".join(o.get("traceback", [])))
        write_atomic(out / f"{ch}.log", scrub("".join(log)))
        wall = 0.0
        if times:
            stamps = sorted(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in times)
            wall = (stamps[-1] - stamps[0]).total_seconds()
        errors = any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
        record["chapters"][ch] = {"wall_s": round(wall, 1), "status": "failed (error output)" if errors else "ok",
                                  "date": record["date"], "commit": record["commit"]}
        save()
        print(f"{ch}: {record['chapters'][ch]['status']}, {figures} figures, {wall:.0f} s", flush=True)
        report_claims(out, ch)
    print(render())
    return out


def summary_text(results: Path = RESULTS) -> str:
    """The text of ``summary.md`` for every results folder under ``results`` (smoke runs first)."""
    from results_page import render_markdown

    order = {"smoke": 0, "full": 1}
    folders = sorted((p for p in results.iterdir() if (p / "run.json").exists()),
                     key=lambda p: (order.get(p.name.split("-")[0], 2), p.name))
    header = "<!-- written by scripts/run_scale.py from the results folders beside it; do not edit -->\n\n"
    if not any(p.name.startswith("full-") for p in folders):
        header += ("No full-scale run is committed yet; `python scripts/run_scale.py --scale full` on a GPU "
                   "adds its column to every table below.\n\n")
    return header + render_markdown({p.name: p for p in folders})


def render() -> Path:
    """Rewrite ``book/results/summary.md`` from every results folder present."""
    path = RESULTS / "summary.md"
    write_atomic(path, summary_text())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["smoke", "full"], default=os.environ.get("REFIMPL_SCALE", "smoke"))
    ap.add_argument("--chapters", nargs="+", choices=CHAPTERS, default=CHAPTERS)
    ap.add_argument("--prepare", action="store_true", help="only convert the notebooks to scripts")
    ap.add_argument("--render", action="store_true", help="only rewrite book/results/summary.md")
    ap.add_argument("--from-notebooks", nargs="+", choices=CHAPTERS, metavar="CHAPTER",
                    help="file the executed notebooks of these chapters as the smoke-scale CPU results")
    ap.add_argument("--dry-run", action="store_true",
                    help=f"tiny model, few seeds ({DRY_SIZES}); results under build/dry-run/, not the book")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.render:
        print(render())
        return
    if args.from_notebooks:
        from_notebooks(args.from_notebooks)
        return
    try:
        import jupytext  # noqa: F401

        prepare(args.chapters)
    except ImportError:
        print("jupytext is not installed: using the scripts already in build/scale-scripts/")
    if args.prepare:
        return
    command = "python scripts/run_scale.py --scale " + args.scale + (
        "" if args.chapters == CHAPTERS else " --chapters " + " ".join(args.chapters))
    if os.environ.get("REFIMPL_SCALE_OVERRIDES") and not args.dry_run:
        sys.exit("REFIMPL_SCALE_OVERRIDES is set: its results would be filed as the scale's own; "
                 "unset it, or use --dry-run (results under build/dry-run/)")
    if args.dry_run:
        os.environ.setdefault("REFIMPL_SCALE_OVERRIDES", DRY_SIZES)
        os.environ["REFIMPL_CACHE"] = str(DRY_RUN / "cache")  # keep the tiny models out of the real cache
        out, ok = run(args.scale, args.chapters, command + " --dry-run", results=DRY_RUN)
    else:
        out, ok = run(args.scale, args.chapters, command)
        print(render())
    print("results in", out.relative_to(ROOT), "" if ok else "-- SOME CHAPTERS FAILED: see their .log files")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
