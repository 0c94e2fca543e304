"""Sampling k completions: refimpl.lm.sample against plain model.generate, and against the bounds of decoding.

    python bench/bench_sample.py [--shape cpu-gpt2] [--device cpu] [--prompts 64] [--k 8] [--new-tokens 128]
                                 [--prompt-length 32] [--repeats 5] [--dtype float32]

Both paths sample the same law from the same model (temperature 1, no truncation), decoding exactly
``--new-tokens`` tokens per completion (stopping is off on the random-weight shapes of
``bench/shapes.py``; on ``toy`` the stop token ends completions and tokens/s counts real tokens, the stop
token included). The contenders alternate run by run; the ratio is refimpl's tokens/s over generate's,
paired within a round, median and range over the rounds.

The bound of one decoding step on B rows reads every weight once (memory) and does 2·N·B FLOPs
(compute): tokens/s <= B / max(weight bytes / bandwidth, 2·N·B / FLOP/s), with the copy bandwidth and
the matmul throughput measured on the device in the same run (the KV cache and attention are left out,
so the bound is optimistic at long contexts).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from timing import describe, interleaved, matmul_flops, memory_bandwidth, ratio_spread, spread  # noqa: E402

from refimpl import config, lm  # noqa: E402
from refimpl.worlds import arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="toy", choices=shapes.SHAPES)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=32, help="prompt tokens (random-weight shapes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    config.quiet()
    device = torch.device(a.device) if a.device else config.device()
    dtype = getattr(torch, a.dtype)
    model, tok = shapes.load(a.shape, device, dtype)
    if a.shape == "toy":
        texts = (arith.prompts("train")[0] * a.prompts)[: a.prompts]
    else:
        texts = shapes.prompts(tok, a.prompts, a.prompt_length)
    with lm.padding_side(tok, "left"):
        enc = tok(texts, return_tensors="pt", padding=True).to(device)
    n_rows = a.prompts * a.k
    stop = model.generation_config.eos_token_id
    counts = {}

    def ours():
        s = lm.sample(model, tok, texts, k=a.k, max_new_tokens=a.new_tokens, seed=0, batch_size=n_rows)
        counts["refimpl.lm.sample"] = s.completion_mask.sum()

    def plain():
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, num_return_sequences=a.k, top_k=0, top_p=1.0, temperature=1.0,
                                 max_new_tokens=a.new_tokens)
        counts["model.generate"] = lm.completion_mask(out[:, enc["input_ids"].shape[1]:], stop).sum()

    times = interleaved({"model.generate": plain, "refimpl.lm.sample": ours}, device, a.repeats)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw, flops = memory_bandwidth(device), matmul_flops(device, dtype)
    step_bound = max(param_bytes / bw, 2 * n_params * n_rows / flops)  # seconds per decoding step
    bound = n_rows / step_bound
    print(describe(device))
    print(f"{a.shape}: {shapes.describe(model) if a.shape != 'toy' else 'refimpl/toy-arith'}; {a.prompts} prompts "
          f"x k={a.k}, prompts of {enc['input_ids'].shape[1]} tokens, {a.new_tokens} new tokens; {a.repeats} rounds")
    print(f"{'path':<20}{'tokens/s: median [range]':>34}{'of bound':>10}")
    tps = {}
    for name, ts in times.items():
        n = int(counts[name])
        tps[name] = [n / t for t in ts]
        print(f"{name:<20}{spread(tps[name]):>34}{sorted(tps[name])[len(ts) // 2] / bound:>10.1%}")
    print(f"ratio refimpl / generate (paired by round): {ratio_spread(tps['refimpl.lm.sample'], tps['model.generate'])}")
    bound_kind = "memory" if param_bytes / bw >= 2 * n_params * n_rows / flops else "compute"
    print(f"bound: {bound:.0f} tokens/s ({bound_kind}-bound at {n_rows} rows; copy bandwidth {bw / 1e9:.1f} GB/s, "
          f"matmul {flops / 1e12:.2f} TFLOP/s in {a.dtype}, {n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
