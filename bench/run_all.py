"""Run every benchmark and save their outputs for the book's Performance page.

    python bench/run_all.py [--device cpu|cuda] [--out book/results]

Each benchmark prints medians of several runs and its ratio against an anchor measured in the
same run on the same device. This script runs them one after another and writes their output,
under a header with the date, device and versions, to ``<out>/bench-<device>.txt``, which the
page includes verbatim (nothing on it is typed by hand).
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import describe  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHES = sorted(p.name for p in HERE.glob("bench_*.py"))  # every benchmark in this folder, by name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "book" / "results"))
    a = ap.parse_args()
    here = Path(__file__).resolve().parent
    lines = [f"date: {datetime.date.today().isoformat()}", describe(torch.device(a.device)), ""]
    for name in BENCHES:
        cmd = [sys.executable, str(here / name), "--device", a.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "REFIMPL_DEVICE": a.device})
        lines += [f"$ python bench/{name} --device {a.device}"]
        lines += [out.stdout.rstrip() if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n{out.stderr[-2000:]}", ""]
    path = Path(a.out) / f"bench-{a.device}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
