"""Run every benchmark and save their outputs for the book's Performance page.

    python bench/run_all.py [--device cpu|cuda] [--out book/results] [--only bench_NAME.py]

On a GPU it runs the issue's real shapes (GPT-2 124M and Qwen2-0.5B with random weights, bf16); on a
CPU the same families scaled down (see ``RUNS`` and ``bench/shapes.py``).

Each benchmark prints medians of several runs and its ratio against an anchor measured in the
same run on the same device. This script runs them one after another and writes their output,
under a header with the date, device and versions, to ``<out>/bench-<device>.txt``, which the
page includes verbatim (nothing on it is typed by hand).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import describe  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHES = sorted(p.name for p in HERE.glob("bench_*.py"))  # every benchmark in this folder, by name
# What each device runs: the shapes on a GPU (bf16, 64 prompts x k = 8, completions of 128-512
# tokens); on a CPU the same families scaled down (bench/shapes.py) so that the whole set runs in about
# 20 minutes on one thread. Every benchmark in this folder appears in both lists.
RUNS = {
    "cpu": [
        "bench_sample.py --shape cpu-gpt2 --prompts 8 --k 4 --new-tokens 128 --repeats 5 --threads 1",
        "bench_qprobe.py --shape cpu-gpt2 --prompts 8 --k 4 --lengths 64,256 --repeats 3 --threads 1",
        "bench_idle.py --shape cpu-qwen2 --batch 32 --steps 16 --prompts 4 --k 8 --new-tokens 16 --repeats 5",
        "bench_gvpo.py --shape cpu-gpt2 --prompts 4 --k 4 --new-tokens 128 --repeats 3 --rounds 2 --threads 1",
    ],
    "cuda": [
        "bench_sample.py --shape gpt2-124m --dtype bfloat16 --prompts 64 --k 8 --new-tokens 256",
        "bench_sample.py --shape qwen2-0.5b --dtype bfloat16 --prompts 64 --k 8 --new-tokens 256",
        "bench_qprobe.py --shape qwen2-0.5b --dtype bfloat16 --prompts 64 --k 8 --lengths 128,256,512",
        "bench_idle.py --shape qwen2-0.5b --dtype bfloat16 --batch 512 --steps 64 --prompts 64 --k 8 --new-tokens 128",
        "bench_gvpo.py --shape gpt2-124m --prompts 64 --k 8 --new-tokens 256",
    ],
}
assert all({c.split()[0] for c in cmds} == set(BENCHES) for cmds in RUNS.values()), "a benchmark is missing from RUNS"


def run(line: str, device: str) -> list[str]:
    """One section of the results file: the command, the date, and the benchmark's output."""
    name, *args = line.split()
    cmd = [sys.executable, str(HERE / name), *args, "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "REFIMPL_DEVICE": device})
    body = out.stdout.rstrip() if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n{out.stderr[-2000:]}"
    return [f"$ python bench/{line} --device {device}", f"(run on {datetime.date.today().isoformat()})", body, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(RUNS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "book" / "results"))
    ap.add_argument("--only", choices=BENCHES, help="re-run this benchmark only and replace its section(s) of the file")
    a = ap.parse_args()
    path = Path(a.out) / f"bench-{a.device}.txt"
    header = [describe(torch.device(a.device)), ""]
    sections = {line: None for line in RUNS[a.device]}
    if a.only and path.is_file():  # keep the other sections as they are
        text = path.read_text().split("\n$ python bench/")
        for chunk in text[1:]:
            line = chunk.split("\n", 1)[0].rsplit(" --device ", 1)[0]
            if line in sections:
                sections[line] = ("$ python bench/" + chunk).rstrip("\n").split("\n") + [""]
    for line in sections:
        if a.only is None or line.split()[0] == a.only or sections[line] is None:
            sections[line] = run(line, a.device)
            print("\n".join(sections[line]), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + [x for lines in sections.values() for x in lines]))


if __name__ == "__main__":
    main()
