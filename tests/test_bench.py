"""The benchmarks: their model shapes are the published ones, and each script runs (at a tiny size)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import shapes  # noqa: E402


@pytest.mark.parametrize("shape, millions", [("gpt2-124m", 124.44), ("qwen2-0.5b", 494.03)])
def test_real_shapes_have_the_published_parameter_counts(shape, millions):
    """GPT-2 small has 124.44M parameters and Qwen2(.5)-0.5B 494.03M (tied embeddings): built on the meta
    device (no memory), the configs must give those counts, so the benchmarks time the real shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes.config(shape))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - millions) < 0.01, f"{shape}: {n / 1e6:.2f}M parameters"


def test_cpu_shapes_keep_the_real_vocabularies():
    for small, real in (("cpu-gpt2", "gpt2-124m"), ("cpu-qwen2", "qwen2-0.5b")):
        assert shapes.config(small).vocab_size == shapes.config(real).vocab_size


def test_a_shape_loads_through_from_pretrained_without_stopping(tmp_path, monkeypatch):
    """The checkpoint folder is written once and loaded by refimpl.load_model; sampling then decodes
    exactly max_new_tokens (stopping off) and every id decodes to a word of the tokenizer."""
    from refimpl import lm

    monkeypatch.setenv("REFIMPL_BENCH_CACHE", str(tmp_path))
    model, tok = shapes.load("cpu-gpt2", "cpu")
    assert (tmp_path / "cpu-gpt2-0" / "config.json").is_file()
    again, _ = shapes.load("cpu-gpt2", "cpu")  # from the folder: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    xs = shapes.prompts(tok, 2, length=5)
    assert [len(ids) for ids in tok(xs)["input_ids"]] == [5, 5]
    s = lm.sample(model, tok, xs, k=2, max_new_tokens=6, seed=0)
    assert s.completion_mask.sum(1).tolist() == [6] * 4
    assert all(len(t.split()) == 6 for t in s.texts)


SMALL = {
    "bench_sample.py": "--prompts 2 --k 2 --new-tokens 2 --repeats 1",
    "bench_qprobe.py": "--prompts 2 --k 2 --lengths 3 --repeats 1",
    "bench_idle.py": "--prompts 2 --k 2 --batch 4 --steps 2 --repeats 1",
    "bench_gvpo.py": "--only refimpl --prompts 2 --k 2 --repeats 1",
}


@pytest.mark.parametrize("script", sorted(SMALL))
def test_each_benchmark_runs_at_a_tiny_size(script):
    assert sorted(SMALL) == sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))
    cmd = [sys.executable, str(ROOT / "bench" / script), "--device", "cpu", *SMALL[script].split()]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("RESULT " if script == "bench_gvpo.py" else "ratio") in out.stdout


@pytest.mark.parametrize("what", ["gvpo", "corrected"])
def test_the_profiler_script_runs(what, tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "profile_ops.py"), "--device", "cpu", "--what", what, "--rows", "8",
           "--new-tokens", "2", "--top", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "REFIMPL_BENCH_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    shares = [float(line.split("%")[0]) for line in out.stdout.splitlines()[1:]]
    assert len(shares) == 3 and all(0 <= s <= 100 for s in shares) and shares == sorted(shares, reverse=True)
