"""Sampling k completions: refimpl.lm.sample against plain model.generate, and against the
memory-bandwidth bound of decoding.

    python bench/bench_sample.py [--device cpu] [--prompts 64] [--k 8] [--new-tokens 8] [--repeats 5]

Both paths sample the same distribution from the same model; tokens/s counts real completion
tokens (up to and including the stop token). The ratio is refimpl's tokens/s over generate's,
measured in the same run on the same device. The bound assumes every decode
step reads all weights once: tokens/s <= batch · bandwidth / parameter bytes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import describe, median_time, memory_bandwidth  # noqa: E402

import refimpl  # noqa: E402
from refimpl import lm  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="refimpl/toy-arith")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    a = ap.parse_args()

    refimpl.config.quiet()
    model, tok = refimpl.load_model(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    device = next(model.parameters()).device
    texts = (arith.prompts("train")[0] * a.prompts)[: a.prompts]
    enc = tok(texts, return_tensors="pt", padding=True).to(device)
    n_rows = a.prompts * a.k
    stop = model.generation_config.eos_token_id

    def ours():
        return lm.sample(model, tok, texts, k=a.k, max_new_tokens=a.new_tokens, seed=0, batch_size=n_rows)

    def plain():
        out = model.generate(**enc, do_sample=True, num_return_sequences=a.k, top_k=0, max_new_tokens=a.new_tokens)
        return lm.completion_mask(out[:, enc["input_ids"].shape[1]:], stop).sum()

    # Real (unpadded) completion tokens per call; both paths sample the same distribution.
    tokens_ours = int(ours().completion_mask.sum())
    tokens_plain = int(plain())
    t_plain = median_time(plain, device, a.repeats)
    t_ours = median_time(ours, device, a.repeats)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = memory_bandwidth(device)
    bound = n_rows * bw / param_bytes
    print(describe(device))
    print(f"model {a.model} ({param_bytes / 2**20:.1f} MiB of weights, {a.dtype}); {a.prompts} prompts x k={a.k}, "
          f"{a.new_tokens} new tokens; medians of {a.repeats} runs")
    print(f"{'path':<22}{'tokens/s':>12}{'ratio':>8}")
    tps_plain, tps_ours = tokens_plain / t_plain, tokens_ours / t_ours
    print(f"{'model.generate':<22}{tps_plain:>12.0f}{1.0:>8.2f}")
    print(f"{'refimpl.lm.sample':<22}{tps_ours:>12.0f}{tps_ours / tps_plain:>8.2f}")
    print(f"bandwidth bound: {bound:.0f} tokens/s (measured copy bandwidth {bw / 1e9:.1f} GB/s); "
          f"generate reaches {tps_plain / bound:.1%} of it")


if __name__ == "__main__":
    main()
